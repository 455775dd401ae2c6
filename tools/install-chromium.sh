#!/usr/bin/env bash
# The browser tests drive Debian's Chromium (Playwright's own browser download cannot run here).
set -euo pipefail
if ! command -v chromium >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
