#!/usr/bin/env bash
# The Docker engine and the drill images, on a machine with no image registry.
#
# Installs Docker's engine and mmdebstrap from Debian's packages if missing, starts the engine
# (no bridge, no iptables: drill containers run with no network at all) if none answers, and
# builds local stand-ins for the official images drills use, under the same names, to the same
# contract (server binaries on PATH, a `postgres` user): a Debian root filesystem made by
# mmdebstrap from the machine's own apt sources, imported with `docker import`.
# Built once; an image that already exists is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ "${#need[@]}" -gt 0 ]; then
    echo "images: installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    mkdir -p .docker
    echo "images: starting dockerd (log in .docker/dockerd.log)"
    $SUDO sh -c 'nohup dockerd --bridge=none --iptables=false --ip6tables=false \
        >.docker/dockerd.log 2>&1 & echo $! >.docker/dockerd.pid'
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { echo "images: dockerd did not start:"; tail -20 .docker/dockerd.log; exit 1; }
fi

build_postgres() {
    local major="$1" image="postgres:$1"
    if docker image inspect "$image" >/dev/null 2>&1; then
        return
    fi
    echo "images: building $image (Debian bookworm + postgresql-$major, about a minute)"
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    # python3 too: the same root filesystem is the base of drbot's own image in the tests
    # (tests/integration/test_image.py), so a fresh machine runs mmdebstrap once, not twice.
    mmdebstrap --quiet --variant=apt --include="postgresql-$major,python3,python3-venv,ca-certificates" \
        bookworm "$tmp/rootfs.tar"
    docker import \
        --change "ENV PATH=/usr/lib/postgresql/$major/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --message "drbot stand-in for the official $image (scripts/images.sh)" \
        "$tmp/rootfs.tar" "$image" >/dev/null
    echo "images: built $image"
}

for major in ${DRBOT_PG_MAJORS:-15}; do
    build_postgres "$major"
done
