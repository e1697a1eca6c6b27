"""A user's mistake at start-up: one line on stderr, exit status 2, nothing created.

Each case runs ``python -m wsbroadcast serve`` in an empty folder (the default store
``./wsbroadcast.db`` would appear there), and the Python API refuses the same settings
with ConfigError.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from wsbroadcast import Config, Server
from wsbroadcast.config import RANGES
from wsbroadcast.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSBROADCAST_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_serve(cwd, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``wsbroadcast serve ARGS`` in ``cwd``; ``prelude`` is Python run first (to hide a package)."""
    code = prelude + "import sys; from wsbroadcast.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "serve", *args], cwd=str(cwd), env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def assert_one_line_error(done: subprocess.CompletedProcess, cwd, *needles: str) -> str:
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("wsbroadcast serve: ") and "Traceback" not in line, line
    for needle in needles:
        assert needle in line, line
    assert sorted(os.listdir(str(cwd))) == sorted(_PREMADE), "a file was created: %s" % os.listdir(str(cwd))
    return line


_PREMADE = ["folder", "empty-secret", "not-a-db"]


@pytest.fixture
def cwd(tmp_path):
    """An empty folder but for a sub-folder, an empty file and a file that is no database."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty-secret").write_text("\n")
    (tmp_path / "not-a-db").write_text("hello, not SQLite\n")
    return tmp_path


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def test_port_in_use(cwd, busy_port):
    line = assert_one_line_error(run_serve(cwd, "--port", str(busy_port)), cwd,
                                 "port %d is in use" % busy_port, "--port")
    assert line == ("wsbroadcast serve: port %d is in use (another server?); pick one with --port"
                    % busy_port)


@pytest.mark.parametrize("port", ["65536"])  # 65535 is accepted: test_every_range_at_and_past_its_edges
def test_port_out_of_range(cwd, port):
    assert_one_line_error(run_serve(cwd, "--port", port), cwd, "--port " + port, "0 to 65535")


@pytest.mark.parametrize("host, needle", [("bad..host", "cannot listen on host 'bad..host'"),
                                          ("192.0.2.1", "not an address of this machine")])
def test_bad_host(cwd, host, needle):
    assert_one_line_error(run_serve(cwd, "--host", host), cwd, needle, "--host")


@pytest.mark.parametrize("store, needle", [
    ("missing/dir/h.db", "does not exist"),
    ("not-a-db", "not a database"),
])
def test_unopenable_store(cwd, store, needle):
    assert_one_line_error(run_serve(cwd, "--port", "0", "--store", store), cwd, needle, "--store")


def test_redis_without_the_extra(cwd):
    # sys.modules[name] = None is how Python itself spells "this package is not installed"
    done = run_serve(cwd, "--port", "0", "--redis", "redis://127.0.0.1:6379/0",
                     prelude="import sys; sys.modules['redis'] = None; ")
    assert_one_line_error(done, cwd, "pip install 'wsbroadcast[redis]'")


def test_redis_bad_url(cwd):
    assert_one_line_error(run_serve(cwd, "--port", "0", "--redis", "http://x"), cwd, "--redis",
                          "redis://HOST:PORT/DB", "redis+sentinel://")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_redis_malformed_sentinel_url(cwd, workers):
    # refused before any worker is forked, and the password is not printed
    line = assert_one_line_error(
        run_serve(cwd, "--port", "0", "--workers", workers,
                  "--redis", "redis+sentinel://:s3cret@127.0.0.1:1,127.0.0.1:2?db=0"),
        cwd, "--redis", "no master name", ":***@127.0.0.1:1")
    assert "s3cret" not in line
    assert_one_line_error(run_serve(cwd, "--port", "0", "--redis", "redis://127.0.0.1:1/0?wait_replicas=two"),
                          cwd, "--redis", "wait_replicas 'two'")


@pytest.mark.parametrize("path, needle", [("missing-secret", "cannot read the secret file"),
                                          ("empty-secret", "is empty")])
def test_bad_secret_file(cwd, path, needle):
    assert_one_line_error(run_serve(cwd, "--port", "0", "--secret-file", path), cwd, needle)


@pytest.mark.parametrize("flag, value", [  # every range is checked in-process below
    ("--max-outbox", "-1"), ("--ping-interval", "nan"),
])
def test_numeric_flag_out_of_range(cwd, flag, value):
    assert_one_line_error(run_serve(cwd, "--port", "0", flag, value), cwd, flag + " " + value, "give")


def test_empty_api_key(cwd):
    assert_one_line_error(run_serve(cwd, "--port", "0", "--api-key", ""), cwd, "--api-key is empty")


def test_debug_log_level_adds_the_traceback(cwd):
    done = run_serve(cwd, "--port", "99999", "--log-level", "debug")
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("wsbroadcast serve: --port 99999 is out of range")


def test_tls_files_that_are_not_pem(cwd):
    assert_one_line_error(run_serve(cwd, "--port", "0", "--certfile", "not-a-db"), cwd,
                          "TLS certificate", "--certfile")


def test_typo_under_serve_prints_serves_usage(cwd):
    done = run_serve(cwd, "--prot", "8080")
    assert done.returncode == 2
    assert "usage: wsbroadcast serve" in done.stderr and "--port PORT" in done.stderr
    assert done.stderr.splitlines()[-1] == "wsbroadcast serve: error: unrecognized arguments: --prot 8080"


def test_version():
    done = subprocess.run([sys.executable, "-m", "wsbroadcast", "--version"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    import wsbroadcast
    assert done.returncode == 0 and done.stdout.strip() == "wsbroadcast " + wsbroadcast.__version__


# --------------------------------------------------------------------------- Python API


def _edges(rng):
    """(accepted, refused) values at and just past each edge of a range."""
    step = 1 if rng.integer else 1e-6 * max(1.0, abs(rng.low))
    ok, bad = [rng.low], [rng.low - step]
    if rng.high is not None:
        ok.append(rng.high)
        bad.append(rng.high + step * max(1, rng.high) if not rng.integer else rng.high + 1)
    if rng.zero:
        ok.append(0)
    bad += [float("nan"), float("inf")] if not rng.integer else [float(rng.low), True, "1"]
    return ok, bad


@pytest.mark.parametrize("name", sorted(RANGES))
def test_every_range_at_and_past_its_edges(name):
    rng = RANGES[name]
    ok, bad = _edges(rng)
    for value in ok:
        assert getattr(Config(**{name: value}), name) == value
    for value in bad:
        with pytest.raises(ConfigError, match="give"):
            Config(**{name: value})
    if rng.optional:
        assert getattr(Config(**{name: None}), name) is None


def test_config_replace_is_checked_too():
    with pytest.raises(ConfigError, match="--max-outbox -1"):
        Config().replace(max_outbox=-1)
    with pytest.raises(ConfigError, match="--path"):
        Config(path="ws")


def test_server_refuses_out_of_range_settings_before_creating_anything(tmp_path):
    store = tmp_path / "h.db"
    with pytest.raises(ConfigError, match="--max-outbox"):
        Server("127.0.0.1", 0, store=str(store), max_outbox=-1)
    with pytest.raises(ConfigError, match="--port 70000"):
        Server("127.0.0.1", 70000, store=str(store))
    assert not store.exists()


def test_server_start_on_a_busy_port_is_a_config_error(busy_port):
    fds = len(os.listdir("/proc/self/fd"))
    srv = Server("127.0.0.1", busy_port, store="memory")
    try:
        with pytest.raises(ConfigError, match="port %d is in use" % busy_port):
            srv.start()
    finally:
        srv.shutdown()
    assert len(os.listdir("/proc/self/fd")) == fds  # a server that never started gives back its fds


# --------------------------------------------------------------------------- help text


def _help(capsys, *argv: str) -> str:
    from wsbroadcast.cli import main
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_serve_help_says_each_default_once_in_human_units(capsys):
    text = _help(capsys, "serve")
    flat = " ".join(text.split())  # argparse wraps lines
    assert "(default: None)" not in flat and flat.count("(default:") >= 15
    for chunk in re.split(r"\n  -", text):
        assert chunk.count("(default:") <= 1, chunk
    assert "--max-outbox BYTES unsent bytes" in flat and "(1008) (default: 1 MiB)" in flat
    assert "(default: 256 KiB)" in flat and "(default: wsbroadcast.db)" in flat
    assert "./wsbroadcast.db" in flat  # the description says where history goes
    scale_out = text.split("scale-out:")[1]
    assert scale_out.lstrip().startswith("--redis URL") and "security:" in scale_out


def test_token_help_gives_defaults(capsys):
    flat = " ".join(_help(capsys, "token").split())
    assert "(default: 3600)" in flat and "(default: HS256 with a secret, else from the key's type)" in flat
    assert "Authorization: Bearer" in flat


def test_stress_script_under_a_python_without_the_dependencies_says_which_to_use(tmp_path):
    # sys.modules["jwt"] = None: PyJWT is not installed (the system's python3, outside the venv)
    code = ("import sys, runpy; sys.modules['jwt'] = None; sys.argv = ['stress.py', '--duration', '1'];"
            "runpy.run_path(%r, run_name='__main__')" % os.path.join(ROOT, "scripts", "stress.py"))
    done = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert "has no module 'jwt'" in done.stderr and ".venv/bin/python scripts/stress.py" in done.stderr
