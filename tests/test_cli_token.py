"""``wsbroadcast token`` mints what the server accepts; ``wsbroadcast serve`` takes its
secret from ``--secret-file`` or ``$WSBROADCAST_SECRET`` (child processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List, Tuple

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import wsraw
from serverproc import ServerProcess

from wsbroadcast.auth import mint_token

pytestmark = pytest.mark.timeout(60)

SECRET = "cli-test-secret-0123456789-abcdefghij"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WSBROADCAST_SECRET", "WSBROADCAST_API_KEY")}
    env.update(extra)
    return env


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsbroadcast", *args], env=env or _env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def mint(*args: str, env=None) -> str:
    done = run_cli("token", *args, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return lines[0]


def ws_with(port: int, tok: str) -> wsraw.RawWS:
    return wsraw.connect(port, path="/ws?token=" + tok)


def answers(c: wsraw.RawWS, frames: List[dict]) -> List[dict]:
    out = []
    for frame in frames:
        c.send_json(frame)
        reply = c.recv_json()
        assert reply.get("id") == frame["id"]
        out.append(reply)
    return out


def kinds(replies: List[dict]) -> List[Tuple[str, str]]:
    return [(r["type"], r.get("code", "")) for r in replies]


def refused(port: int, path: str = "/ws") -> bool:
    try:
        wsraw.connect(port, path=path).close()
    except AssertionError as exc:
        assert "answered 401" in str(exc), exc
        return True
    return False


def write_pem(folder, name: str, key, fmt=serialization.PrivateFormat.PKCS8) -> Tuple[str, bytes]:
    path = os.path.join(str(folder), name)
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, public


# --------------------------------------------------------------------------- token


def test_token_with_secret_is_accepted_with_its_rights(make_server):
    before = int(time.time())
    tok = mint("--secret", SECRET, "--sub", "ann", "--subscribe", "news.*", "--publish", "news.eu",
               "--lifetime", "60")
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert jwt.get_unverified_header(tok)["alg"] == "HS256"
    assert claims["sub"] == "ann" and claims["subscribe"] == ["news.*"] and claims["publish"] == ["news.eu"]
    assert before + 59 <= claims["exp"] <= int(time.time()) + 61

    srv = make_server(secret=SECRET)
    c = ws_with(srv.port, tok)
    replies = answers(c, [
        {"type": "subscribe", "topic": "news.eu", "id": 1},
        {"type": "subscribe", "topic": "news.*", "id": 2},
        {"type": "subscribe", "topic": "sport.x", "id": 3},
        {"type": "subscribe", "topic": "news.>", "id": 4},
        {"type": "publish", "topic": "news.fr", "data": 0, "id": 5},
        {"type": "publish", "topic": "news.eu", "data": 1, "id": 6},
    ])
    assert kinds(replies) == [("ack", ""), ("ack", ""), ("error", "forbidden"), ("error", "forbidden"),
                              ("error", "forbidden"), ("ack", "")]
    assert replies[-1]["seq"] == 1
    c.close()
    # a server with another secret refuses it
    other = make_server(secret=SECRET + "-other")
    assert refused(other.port, "/ws?token=" + tok)


def test_token_from_environment_and_repeated_patterns(make_server):
    tok = mint("--subscribe", "a", "--subscribe", "b.*", "--lifetime", "0", env=_env(WSBROADCAST_SECRET=SECRET))
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert claims["subscribe"] == ["a", "b.*"] and claims["publish"] == [] and "exp" not in claims
    srv = make_server(secret=SECRET)
    c = ws_with(srv.port, tok)
    assert kinds(answers(c, [{"type": "subscribe", "topic": "b.c", "id": 1},
                             {"type": "publish", "topic": "a", "data": 1, "id": 2}])) == [
        ("ack", ""), ("error", "forbidden")]
    c.close()


@pytest.mark.parametrize("kind", ["rsa", "ec-pkcs8", "ec-traditional"])
def test_token_with_private_key_against_public_key_server(make_server, tmp_path, kind):
    if kind == "rsa":
        key, alg, fmt = rsa.generate_private_key(65537, 2048), "RS256", serialization.PrivateFormat.PKCS8
    else:
        key, alg = ec.generate_private_key(ec.SECP256R1()), "ES256"
        fmt = (serialization.PrivateFormat.PKCS8 if kind == "ec-pkcs8"
               else serialization.PrivateFormat.TraditionalOpenSSL)
    path, public = write_pem(tmp_path, "key.pem", key, fmt)
    tok = mint("--private-key", path, "--sub", "svc", "--subscribe", "x.>", "--publish", "x.y")
    assert jwt.get_unverified_header(tok)["alg"] == alg
    srv = make_server(public_key=public)
    c = ws_with(srv.port, tok)
    assert kinds(answers(c, [{"type": "publish", "topic": "x.y", "data": 1, "id": 1},
                             {"type": "publish", "topic": "x.z", "data": 1, "id": 2},
                             {"type": "subscribe", "topic": "x.>", "id": 3},
                             {"type": "subscribe", "topic": "y", "id": 4}])) == [
        ("ack", ""), ("error", "forbidden"), ("ack", ""), ("error", "forbidden")]
    c.close()
    # a server with a secret only does not accept it
    assert refused(make_server(secret=SECRET).port, "/ws?token=" + tok)


def test_token_without_secret_is_a_usage_error():
    done = run_cli("token", "--sub", "ann")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--secret" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [
    ["--secret", ""],
    ["--secret-file", "/nonexistent/secret"],
    ["--private-key", "/nonexistent/key.pem"],
    ["--secret", SECRET, "--subscribe", "bad..pattern"],
])
def test_token_bad_input_is_a_clear_error(args):
    done = run_cli("token", *args)
    assert done.returncode == 2, done
    assert done.stdout == "" and done.stderr.startswith("wsbroadcast token:")
    assert "Traceback" not in done.stderr and SECRET not in done.stderr


# --------------------------------------------------------------------------- serve


def _check_auth_on(port: int) -> None:
    assert refused(port)
    assert refused(port, "/ws?token=" + mint_token(SECRET + "-wrong", subscribe=[">"]))
    c = ws_with(port, mint_token(SECRET, subscribe=["t"], publish=["t"]))
    assert kinds(answers(c, [{"type": "subscribe", "topic": "t", "id": 1},
                             {"type": "subscribe", "topic": "u", "id": 2}])) == [("ack", ""), ("error", "forbidden")]
    c.close()
    status, headers, body = wsraw.http_request(
        port, b"GET /history?topic=t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status == 401 and json.loads(body)["error"] == "unauthorized"


def test_serve_secret_file_enables_auth(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    with ServerProcess("--store", "memory", "--secret-file", str(path), env=_env()) as proc:
        _check_auth_on(proc.port)
        assert proc.terminate() == 0
    assert not any(SECRET in line for line in proc.lines)


def test_serve_secret_from_environment_enables_auth():
    with ServerProcess("--store", "memory", env=_env(WSBROADCAST_SECRET=SECRET)) as proc:
        _check_auth_on(proc.port)
        assert proc.terminate() == 0
    assert not any(SECRET in line for line in proc.lines)


def test_serve_without_secret_is_open():
    with ServerProcess("--store", "memory", env=_env()) as proc:
        c = wsraw.connect(proc.port)
        assert kinds(answers(c, [{"type": "subscribe", "topic": "u", "id": 1}])) == [("ack", "")]
        c.close()


@pytest.mark.parametrize("args", [["--secret-file", "/nonexistent/secret"], ["--secret", ""],
                                  ["--public-key", "/nonexistent/key.pem"]])
def test_serve_bad_secret_is_a_clear_error(args):
    done = subprocess.run([sys.executable, "-m", "wsbroadcast", "serve", "--host", "127.0.0.1", "--port", "0",
                           "--store", "memory", *args], env=_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert done.stderr.startswith("wsbroadcast serve:") and "Traceback" not in done.stderr


def test_serve_public_key_that_is_no_key(tmp_path):
    path = tmp_path / "not-a-key.pem"
    path.write_text("hello\n")
    done = subprocess.run([sys.executable, "-m", "wsbroadcast", "serve", "--host", "127.0.0.1", "--port", "0",
                           "--store", "memory", "--public-key", str(path)], env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert "wsbroadcast serve:" in done.stderr and "Traceback" not in done.stderr
