#!/usr/bin/env bash
# The browser tests drive Debian's Chromium (Playwright's own browser download cannot run here).
set -euo pipefail
# DejaVu Sans: the host stand-in's grid labels (the WebUI ships Roboto for them). Noto Color Emoji: the tab's 🔄 and
# ℹ️ as a user's browser shows them, in the README's screenshots.
if ! command -v chromium >/dev/null || ! fc-list 2>/dev/null | grep -q DejaVuSans.ttf \
        || ! fc-list 2>/dev/null | grep -q NotoColorEmoji; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-dejavu-core fonts-noto-color-emoji fontconfig
fi
