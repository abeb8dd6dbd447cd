#!/usr/bin/env bash
# Build drbot's container image (Dockerfile) with no network and no image registry:
#
#   1. the wheelhouse build/wheels: every dependency from requirements.lock (hash-checked,
#      wheels only, remade when the lock changes) and drbot's own wheel from this checkout
#      (remade every time, reproducibly, so an unchanged checkout reuses Docker's cached layers);
#   2. the base: unless BASE is given, drbot-base:bookworm-pg15 (…-pg15-server with
#      WITH_SERVER=1), a Debian 12 root filesystem made by mmdebstrap from the machine's own apt
#      sources with the packages the Dockerfile needs, imported with `docker import`; built once;
#   3. `docker build --network none` of the Dockerfile on that base.
#
# Environment: IMAGE (default drbot:dev), BASE (an existing Debian 12 image to build on),
# PG_MAJOR (15), WITH_SERVER (1: add the PostgreSQL server binaries for the process sandbox).
# Starts the Docker engine through scripts/images.sh if none answers. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-drbot:dev}"
PG_MAJOR="${PG_MAJOR:-15}"
WITH_SERVER="${WITH_SERVER:-0}"
PY=.venv/bin/python
[ -x "$PY" ] || ./scripts/bootstrap.sh
# The wheels are the host's: they fit the image because both are Debian 12's Python 3.11 on the
# same architecture.
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "image: .venv's Python must be 3.11, as in the image (Debian 12)"; exit 1; }

if ! docker info >/dev/null 2>&1 || { [ -z "${BASE:-}" ] && ! command -v mmdebstrap >/dev/null; }; then
    ./scripts/images.sh
fi

# One build at a time in this checkout (they share build/wheels and the tag).
mkdir -p build
exec 9>build/.image.lock
flock 9

# ---- 1. wheels -------------------------------------------------------------------------------
deps=build/wheels/deps
stamp="$deps/.lock-$(sha256sum requirements.lock | cut -c1-16)"
if [ -f "$stamp" ]; then
    echo "image: dependency wheels are current ($deps)"
else
    echo "image: downloading dependency wheels from requirements.lock into $deps"
    rm -rf "$deps"
    mkdir -p "$deps"
    "$PY" -m pip download -qq --disable-pip-version-check --require-hashes --only-binary=:all: \
        --no-deps -r requirements.lock -d "$deps"
    touch "$stamp"
fi

src="$(mktemp -d)"
tmp=""
trap 'rm -rf "$src" ${tmp:+"$tmp"}' EXIT
# A clean copy, so nothing stale (build/lib, *.egg-info, __pycache__) gets into the wheel.
tar --exclude=__pycache__ --exclude='*.so' -cf - pyproject.toml setup.py README.md drbot \
    | tar -xf - -C "$src"
rm -rf build/wheels/drbot
# Fixed timestamps: the same sources make the same wheel, and Docker's cache holds.
SOURCE_DATE_EPOCH=315532800 "$PY" -m pip wheel -qq --disable-pip-version-check --no-deps \
    --no-build-isolation --no-index -w build/wheels/drbot "$src"
# Its build is optional (setup.py); an image without it would run logical backups slower.
"$PY" -c 'import sys, zipfile; sys.exit(not any("/_rowsum." in n for n in
    zipfile.ZipFile(sys.argv[1]).namelist()))' build/wheels/drbot/drbot-*.whl \
    || { echo "image: the wheel lacks drbot's C extension (see setup.py)"; exit 1; }
echo "image: built $(basename build/wheels/drbot/drbot-*.whl) (sha256 $(sha256sum build/wheels/drbot/drbot-*.whl | cut -c1-12))"

# ---- 2. base ---------------------------------------------------------------------------------
if [ -z "${BASE:-}" ]; then
    # The same packages as the Dockerfile's runtime stage.
    pkgs="python3,python3-venv,ca-certificates,postgresql-client-$PG_MAJOR"
    BASE="drbot-base:bookworm-pg$PG_MAJOR"
    if [ "$WITH_SERVER" = 1 ]; then
        pkgs="$pkgs,postgresql-$PG_MAJOR"
        BASE="$BASE-server"
    fi
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        echo "image: base $BASE exists"
    else
        echo "image: building base $BASE (Debian bookworm + $pkgs, about a minute)"
        tmp="$(mktemp -d)"
        # Like debian:bookworm-slim: no documentation or translations; and no database cluster
        # made by the server package's installation.
        mmdebstrap --quiet --variant=apt --include="$pkgs" \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            --essential-hook='mkdir -p "$1/etc/postgresql-common/createcluster.d" && echo "create_main_cluster = false" >"$1/etc/postgresql-common/createcluster.d/drbot.conf"' \
            bookworm "$tmp/rootfs.tar"
        docker import --message "drbot's local base (scripts/image.sh)" \
            "$tmp/rootfs.tar" "$BASE" >/dev/null
        echo "image: built base $BASE"
    fi
fi

# ---- 3. the image ----------------------------------------------------------------------------
echo "image: docker build --network none --build-arg BASE=$BASE -t $IMAGE"
previous="$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
if ! out="$(docker build -q --network none --build-arg "BASE=$BASE" --build-arg "PG_MAJOR=$PG_MAJOR" \
    --build-arg "WITH_SERVER=$WITH_SERVER" -t "$IMAGE" . 2>&1)"; then
    echo "$out"
    echo "image: docker build failed"
    exit 1
fi
current="$(docker image inspect -f '{{.Id}}' "$IMAGE")"
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    # The image this build replaced (untagged now): removed, unless a container still uses it.
    docker image rm "$previous" >/dev/null 2>&1 || true
fi
size="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
echo "image: built $IMAGE ($((size / 1000000)) MB) on $BASE"
