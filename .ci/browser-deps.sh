#!/usr/bin/env bash
# System packages for the browser test (tests/test_ui_browser.py, `pytest -m slow`):
# Debian's Chromium, driven headless by Playwright (pip extra "test") via executable_path.
# `playwright install` is not used: it downloads its own browsers from the internet.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
fi
/usr/bin/chromium --version
