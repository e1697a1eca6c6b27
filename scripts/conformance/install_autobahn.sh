#!/usr/bin/env bash
# Install the Autobahn TestSuite (wstest) into a cached Python 2.7 virtualenv.
#
# autobahntestsuite only runs on Python 2, so this script builds a Python 2.7
# env from pyenv's 2.7.18 with a set of pins known to work together.
#
# Idempotent: exits 0 at once when ENV/bin/wstest already runs.
#
# Environment:
#   AUTOBAHN_ENV   where the env goes   (default ~/.cache/wsbroadcast/autobahn-env)
#   AUTOBAHN_PY27  the Python 2.7 interpreter
#                  (default ${PYENV_ROOT:-~/.pyenv}/versions/2.7.18/bin/python)
#   PYTHON3        Python 3 used to run virtualenv<20.22 (default python3)
#
# Exit codes: 0 installed (or already there), 3 Python 2.7.18 absent,
#             1 any other failure.
set -euo pipefail

ENV_DIR="${AUTOBAHN_ENV:-$HOME/.cache/wsbroadcast/autobahn-env}"
PY27="${AUTOBAHN_PY27:-${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python}"
PYTHON3="${PYTHON3:-python3}"
BOOTSTRAP_DIR="${ENV_DIR}.bootstrap"

PINS=(
    "setuptools==44.0.0"
    "txaio==2.1.0"
    "incremental==16.10.1"
    "pyOpenSSL==19.1.0"
    "cryptography==3.3.2"
    "Twisted==19.10.0"
    "zope.interface==4.6.0"
    "jinja2==2.11.3"
    "markupsafe==1.1.1"
    "Werkzeug==1.0.1"
    "klein==17.10.0"
    "service_identity==18.1.0"
    "unittest2==1.1.0"
    "six==1.16.0"
    "autobahn[accelerate,twisted]==0.10.9"
    "autobahntestsuite==25.10.1"
)

log() { echo "install_autobahn: $*" >&2; }

installed() { [ -x "$ENV_DIR/bin/wstest" ] && "$ENV_DIR/bin/wstest" --help >/dev/null 2>&1; }

if installed; then
    log "already installed: $ENV_DIR/bin/wstest"
    exit 0
fi

# One install at a time: the test suites of several interpreters run at once and may
# all find wstest missing; the others wait here, then find it installed.
mkdir -p "$(dirname "$ENV_DIR")"
exec 9>"${ENV_DIR}.lock"
flock 9
if installed; then
    log "installed meanwhile by another run: $ENV_DIR/bin/wstest"
    exit 0
fi

if [ ! -x "$PY27" ] || ! "$PY27" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' >/dev/null 2>&1; then
    log "Python 2.7 not found at $PY27"
    log "autobahntestsuite needs Python 2.7 (install it with: pyenv install 2.7.18,"
    log "or point AUTOBAHN_PY27 at a Python 2.7 interpreter)."
    exit 3
fi

if ! command -v "$PYTHON3" >/dev/null 2>&1; then
    log "no Python 3 interpreter ($PYTHON3) to run virtualenv"
    exit 1
fi

start=$(date +%s)

# A half-built env from an interrupted run is thrown away.
rm -rf "$ENV_DIR"

# virtualenv >= 20.22 can no longer create Python 2 envs.
if [ ! -x "$BOOTSTRAP_DIR/bin/virtualenv" ]; then
    log "creating bootstrap venv with virtualenv<20.22 in $BOOTSTRAP_DIR"
    rm -rf "$BOOTSTRAP_DIR"
    "$PYTHON3" -m venv "$BOOTSTRAP_DIR"
    "$BOOTSTRAP_DIR/bin/python" -m pip install -q --disable-pip-version-check "virtualenv<20.22"
fi

log "creating Python 2.7 env in $ENV_DIR"
"$BOOTSTRAP_DIR/bin/virtualenv" -q -p "$PY27" "$ENV_DIR"

log "installing autobahntestsuite and pins"
PIP_NO_PYTHON_VERSION_WARNING=1 "$ENV_DIR/bin/python" -m pip install -q \
    --disable-pip-version-check "${PINS[@]}"

if ! "$ENV_DIR/bin/wstest" --help >/dev/null 2>&1; then
    log "install finished but '$ENV_DIR/bin/wstest --help' fails:"
    "$ENV_DIR/bin/wstest" --help >&2 || true
    exit 1
fi

log "installed $ENV_DIR/bin/wstest in $(( $(date +%s) - start )) s"
