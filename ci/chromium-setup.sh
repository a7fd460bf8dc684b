#!/usr/bin/env bash
# Installs Debian's Chromium for the Prefect UI test (tests/test_demo.py) when missing.
# Never fails CI: without a browser the UI test skips and says why.
exec bash "$(dirname "$0")/apt-install.sh" "the Prefect UI test" "command -v chromium" \
    chromium fonts-dejavu-core
