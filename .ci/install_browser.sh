#!/usr/bin/env bash
# Install Debian's Chromium for the MLflow UI browser test (tests/test_ui.py drives it headless with
# Playwright's Python package, which is a test dependency: no browser download, the system one is used).
# Idempotent; needs root (CI containers run as root) or passwordless sudo.
set -euo pipefail
bash "$(dirname "$0")/apt_install.sh" chromium fonts-dejavu-core
echo "install_browser: $(chromium --version 2>/dev/null || echo 'chromium: not found')"
