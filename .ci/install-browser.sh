#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for tests/test_browser.py (Playwright drives it through
# executable_path=/usr/bin/chromium; no browser is downloaded). Idempotent: does nothing when present.
set -euo pipefail
CHROMIUM="${FASC_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "chromium present: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "error: $CHROMIUM is missing and this user cannot install packages; run as root: apt-get install -y chromium" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
"$CHROMIUM" --version
