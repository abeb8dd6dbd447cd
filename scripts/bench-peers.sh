#!/usr/bin/env bash
# The peer tools the benchmark compares drbot with, from Debian's packages, idempotently:
# pgBackRest, stunnel (a TLS front for the plain-HTTP moto S3 server, since pgBackRest only
# speaks HTTPS to S3), the zstd command line tool, and GNU time (the harness measures with it).
#
# `make bench` needs them, and `make test` for the smoke run of the harness; `make demo` does not.
set -euo pipefail

need_pkgs=()
command -v pgbackrest >/dev/null || need_pkgs+=(pgbackrest)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || need_pkgs+=(stunnel4)
command -v zstd >/dev/null || need_pkgs+=(zstd)
[ -x /usr/bin/time ] || need_pkgs+=(time)

if [ "${#need_pkgs[@]}" -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
echo "bench-peers: installing Debian packages: ${need_pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
