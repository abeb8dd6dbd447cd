#!/usr/bin/env bash
# Set up everything drbot needs on a fresh Debian 12 machine, idempotently:
# Debian packages (PostgreSQL 15 server and client tools, Python venv support), then a
# virtualenv in .venv with the exact dependencies of the lock file (hash-checked).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else SUDO=""; fi
fi

need_pkgs=()
pg_bin=""
for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_dump" ] && pg_bin="$d"
done
[ -n "$pg_bin" ] || need_pkgs+=(postgresql-15 postgresql-client-15)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
# The fingerprint's C loop (setup.py): a compiler, Python's headers and xxhash.h. Optional to
# drbot (it falls back to Python), not to this setup: logical backups run at half speed without.
command -v gcc >/dev/null || need_pkgs+=(gcc libc6-dev)
python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
    2>/dev/null || need_pkgs+=(python3-dev)
[ -f /usr/include/xxhash.h ] || need_pkgs+=(libxxhash-dev)

if [ "${#need_pkgs[@]}" -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
    # Debian's package starts a cluster of its own; drbot's tests and demo start private servers.
fi

LOCK="${1:-requirements-dev.lock}"
stamp=".venv/.installed-$(sha256sum "$LOCK" pyproject.toml setup.py drbot/engines/postgres/_rowsum.c \
    | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "bootstrap: creating .venv from $LOCK"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r "$LOCK"
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
    rm -f .venv/.installed-*
    # Without the extension (its build is optional) no stamp: the next run builds it again.
    if .venv/bin/python -c 'import drbot.engines.postgres._rowsum' 2>/dev/null; then
        touch "$stamp"
    else
        echo "bootstrap: warning: drbot's C fingerprint loop did not build; logical backups" \
            "will read pg_dump's rows in Python (slower)" >&2
    fi
fi
# Every drbot command starts a Python process; without compiled modules (an editable install
# has none, and PYTHONDONTWRITEBYTECODE may forbid writing them) each start compiles drbot
# again, a quarter of a second. Cheap when nothing changed.
.venv/bin/python -m compileall -q -j 0 drbot bench >/dev/null
