#!/usr/bin/env bash
# Headless Chromium for the test that opens the HTML evidence report as a person would.
#
# Debian's chromium package (not a browser downloaded by a test tool: this machine has no route
# to such downloads). Only the tests need it, so `make demo` never installs it.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
echo "browser: installing Debian's chromium (for the evidence report test)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
