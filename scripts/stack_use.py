#!/usr/bin/env python3
"""Measure how much thread stack client input can make a CLI server use, path by path.

Each scenario starts ``python -m wsbroadcast serve`` (the command line, so its default
``--thread-stack-size`` unless ``--stack-size`` is given) in a fresh process, drives one kind
of input through real sockets and then reads ``/proc/PID/smaps``: a thread stack is a guard
page followed by a mapping of the stack size, and its pages are faulted in only when touched,
so the resident size of each such mapping is that thread's high-water mark (rounded up to
4 KiB; it includes the thread's descriptor and TLS at the top, a few KiB).

Run it with each interpreter to measure (the server runs on the interpreter running this):

    python scripts/stack_use.py [--stack-size BYTES] [--only NAME ...]

Prints one line per scenario: the deepest stack of any server thread, in KiB.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import wsraw  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

from wsbroadcast.auth import mint_token  # noqa: E402
from wsbroadcast.envelope import MAX_DEPTH  # noqa: E402

SECRET = "stack-use-secret-0123456789abcdef"
#: a sitecustomize that makes one frame text raise inside the reader, so that the
#: reader logs a traceback from the connection thread (the server's error path)
_BOOM_HOOK = """
import os
if os.environ.get("WSB_STACK_BOOM"):
    import wsbroadcast.reader as _r
    _orig = _r.Reader.on_message
    def on_message(self, data, commands, _orig=_orig):
        if data == "boom":
            raise RuntimeError("injected failure to log a traceback")
        return _orig(self, data, commands)
    _r.Reader.on_message = on_message
"""


def nested(depth: int) -> str:
    """A JSON array text nested ``depth`` deep."""
    return "[" * depth + "]" * depth


def thread_stacks_kib(pid: int, size_kib: int) -> List[int]:
    """Resident KiB of each thread-stack mapping (guard page, then ``size_kib`` read-write)."""
    with open("/proc/%d/smaps" % pid) as f:
        blocks = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", f.read())
    out = []
    after_guard = False
    for block in blocks:
        head = block.split("\n", 1)[0]
        size = int(re.search(r"^Size:\s+(\d+)", block, re.M).group(1))
        if after_guard and " rw-p " in head and size == size_kib:
            out.append(int(re.search(r"^Rss:\s+(\d+)", block, re.M).group(1)))
        after_guard = " ---p " in head and size == 4
    return out


#: connections a scenario leaves open: a thread that has ended gives its stack pages back
#: (glibc), so each is measured while its thread is still alive, then closed
KEEP: List[socket.socket] = []


def ws_roundtrip(port: int, frames: List[str], answers: int, subprotocol: Optional[str] = "wsbroadcast.v1",
                 headers=None) -> List[object]:
    c = wsraw.connect(port, subprotocol=subprotocol, headers=headers)
    KEEP.append(c.sock)
    c.send_texts(*frames)
    return [c.recv_json(timeout=10) for _ in range(answers)]


def tls_connect(port: int, ctx: ssl.SSLContext) -> wsraw.RawWS:
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                           server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Protocol: wsbroadcast.v1\r\n\r\n" % (port, key)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"101", head
    KEEP.append(sock)
    return wsraw.RawWS(sock, "wsbroadcast.v1", rest)


def http(port: int, request: bytes) -> int:
    """One request on a kept-alive connection; its status."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    KEEP.append(sock)
    sock.sendall(request)
    return wsraw.read_response(sock, 10)[0]


def post(port: int, body: bytes, extra: str = "") -> int:
    return http(port, ("POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
                       "Content-Length: %d\r\n\r\n" % (extra, len(body))).encode() + body)


def get(port: int, target: str) -> int:
    return http(port, ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target).encode())


# ---------------------------------------------------------------- scenarios

def sc_idle(port: int, _d: str) -> None:
    ws_roundtrip(port, ['{"type":"ping","id":1}'], 1)


def sc_json_ws(port: int, _d: str) -> None:
    data = nested(MAX_DEPTH - 1)  # the frame object is one level more: 64 in all
    got = ws_roundtrip(port, ['{"type":"subscribe","topic":"t","id":1}',
                              '{"type":"publish","topic":"t","id":2,"data":%s}' % data,
                              nested(MAX_DEPTH + 1), "[" * 200000], 5)
    assert [g.get("type") for g in got] == ["ack", "ack", "message", "error", "error"], got
    seed = '{"a":' * MAX_DEPTH + "1" + "}" * MAX_DEPTH
    ws_roundtrip(port, [seed, '{"type":"ping","id":1}'], 2, subprotocol=None)


def sc_json_http(port: int, _d: str) -> None:
    assert post(port, ('{"topic":"t","data":%s}' % nested(MAX_DEPTH - 1)).encode()) == 200
    assert post(port, b"[" * 200000) == 400
    assert get(port, "/history?topic=t") == 200


def sc_sqlite(port: int, _d: str) -> None:
    frames = ['{"type":"publish","topic":"s","id":%d,"data":{"n":%d}}' % (i, i) for i in range(20)]
    ws_roundtrip(port, frames, 20)
    got = ws_roundtrip(port, ['{"type":"subscribe","topic":"s","since":0,"id":1}'], 21)
    assert got[0]["type"] == "ack" and got[-1]["seq"] == 20, got[-1]
    assert get(port, "/history?topic=s&since=5") == 200
    assert post(port, b'{"topic":"s","data":1}') == 200


def sc_topics(port: int, _d: str) -> None:
    star = ".".join(["*"] * 128)  # 255 bytes: the longest pattern, the deepest trie walk
    topic = ".".join(["a"] * 128)
    got = ws_roundtrip(port, ['{"type":"subscribe","topic":"%s","id":1}' % star,
                              '{"type":"subscribe","topic":"a.>","id":2}',
                              '{"type":"publish","topic":"%s","id":3,"data":1}' % topic], 4)
    assert got[-1].get("type") == "message", got


def sc_tls(port: int, d: str) -> None:
    import certs
    ctx = certs.client_context(os.path.join(d, "cert.pem"))
    c = tls_connect(port, ctx)
    c.send_texts('{"type":"publish","topic":"t","id":1,"data":%s}' % nested(MAX_DEPTH - 1))
    assert c.recv_json(timeout=10)["type"] == "ack"
    c.close()


def sc_jwt(port: int, _d: str) -> None:
    token = mint_token(SECRET, subscribe=[">"], publish=[">"])
    got = ws_roundtrip(port, ['{"type":"publish","topic":"t","id":1,"data":1}'], 1,
                       headers=[("Authorization", "Bearer " + token)])
    assert got[0]["type"] == "ack", got
    deep = base64.urlsafe_b64encode(b"[" * 12000).rstrip(b"=").decode() + ".e30.x"
    assert get(port, "/history?topic=t&token=" + deep) == 401
    assert post(port, b'{"topic":"t","data":1}', "Authorization: Bearer %s\r\n" % token) == 200


def sc_jwt_rsa(port: int, d: str) -> None:
    with open(os.path.join(d, "rsa.pem"), "rb") as f:
        token = mint_token(f.read(), subscribe=[">"], publish=[">"], algorithm="RS256")
    assert post(port, b'{"topic":"t","data":1}', "Authorization: Bearer %s\r\n" % token) == 200


def sc_deflate(port: int, _d: str) -> None:
    import zlib
    c = wsraw.connect(port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    KEEP.append(c.sock)
    for frame in ('{"type":"subscribe","topic":"z","id":1}',
                  '{"type":"publish","topic":"z","id":2,"data":%s}' % nested(MAX_DEPTH - 1)):
        z = zlib.compressobj(wbits=-15)
        c.send_frame(0x1, (z.compress(frame.encode()) + z.flush(zlib.Z_SYNC_FLUSH))[:-4], rsv=4)
    for _ in range(3):  # ack, ack, message (compressed or not: only their arrival matters)
        assert c.recv_raw(timeout=10)[0] & 0x0F == 0x1


def sc_traceback(port: int, _d: str) -> None:
    c = wsraw.connect(port)
    KEEP.append(c.sock)
    c.send_text("boom")
    c.expect_close(timeout=10)  # the reader then waits for the peer's close: alive


SCENARIOS: Dict[str, Callable[[int, str], None]] = {
    "idle (ping)": sc_idle,
    "JSON depth 64, WebSocket v1 + plain": sc_json_ws,
    "JSON depth 64, HTTP publish + history": sc_json_http,
    "sqlite store: publish, replay, history": sc_sqlite,
    "topics: 128-token wildcard match": sc_topics,
    "TLS (EC P-256) handshake + publish": sc_tls,
    "JWT HS256 + deep token header": sc_jwt,
    "JWT RS256 (public key)": sc_jwt_rsa,
    "permessage-deflate: compressed frames": sc_deflate,
    "logged traceback in a reader": sc_traceback,
}


def server_args(name: str, d: str) -> List[str]:
    if name.startswith("sqlite"):
        return ["--store", os.path.join(d, "h.db")]
    args = ["--store", "memory"]
    if name.startswith("TLS"):
        import certs
        certfile, keyfile = certs.make_cert(d)
        args += ["--certfile", certfile, "--keyfile", keyfile]
    if name.startswith("JWT RS256"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with open(os.path.join(d, "rsa.pem"), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        with open(os.path.join(d, "rsa.pub"), "wb") as f:
            f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
        args += ["--public-key", os.path.join(d, "rsa.pub")]
    return args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack-size", type=int, default=0,
                    help="pass --thread-stack-size to the server (default: the CLI's default)")
    ap.add_argument("--only", action="append", default=[], help="scenarios whose name starts with this")
    args = ap.parse_args()
    if args.stack_size:
        size_kib = args.stack_size // 1024
    else:
        from wsbroadcast.cli import _STACK_SIZE
        size_kib = _STACK_SIZE // 1024
    print("python %s, thread stack %d KiB" % (sys.version.split()[0], size_kib))
    worst = 0
    for name, scenario in SCENARIOS.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "sitecustomize.py"), "w") as f:
                f.write(_BOOM_HOOK)
            env = dict(os.environ, WSBROADCAST_SECRET=SECRET if name.startswith("JWT HS") else "",
                       PYTHONPATH=os.pathsep.join([d, str(ROOT), os.environ.get("PYTHONPATH", "")]))
            if name.startswith("logged"):
                env["WSB_STACK_BOOM"] = "1"
            extra = ["--thread-stack-size", str(args.stack_size)] if args.stack_size else []
            with ServerProcess(*(server_args(name, d) + extra), cwd=str(ROOT), env=env) as proc:
                try:
                    scenario(proc.port, d)
                    time.sleep(0.2)  # let the connection threads finish their last steps
                    alive = proc.proc.poll() is None
                    stacks = thread_stacks_kib(proc.pid, size_kib) if alive else []
                except Exception as exc:  # report and go on: a crash is a finding
                    alive = proc.proc.poll() is None
                    stacks = thread_stacks_kib(proc.pid, size_kib) if alive else []
                    name += " [%s: %s]" % (type(exc).__name__, exc)
            for sock in KEEP:
                sock.close()
            del KEEP[:]
        deepest = max(stacks) if stacks else 0
        worst = max(worst, deepest)
        print("  %-46s %4d KiB%s" % (name, deepest, "" if alive else "  SERVER DIED (rc %s)" % proc.proc.returncode))
        if os.environ.get("STACK_USE_ALL"):
            print("    every thread stack:", stacks)
    print("  deepest of all: %d KiB of %d KiB" % (worst, size_kib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
