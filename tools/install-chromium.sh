#!/usr/bin/env bash
# The browser tests drive Debian's Chromium (Playwright's own browser download cannot run here).
set -euo pipefail
# DejaVu Sans: the host stand-in's grid labels (the WebUI ships Roboto for them).
if ! command -v chromium >/dev/null || ! fc-list 2>/dev/null | grep -q DejaVuSans.ttf; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-dejavu-core fontconfig
fi
