#!/usr/bin/env bash
# Installs Debian packages a test needs when they are missing, for the ci/*-setup.sh scripts:
#   bash ci/apt-install.sh WHAT CHECK PACKAGE...
# WHAT names the test that skips without them; CHECK is a shell test that passes when they are
# there already. Idempotent. Never fails CI: what cannot be done is said, and the test skips.
set -uo pipefail
what=$1 check=$2
shift 2
if bash -c "$check" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$(basename "$0"): not root or no apt-get; $what will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt run (the other setups) instead of failing on the dpkg lock.
apt_get() { apt-get -o DPkg::Lock::Timeout=900 "$@"; }
if ! { apt_get update -qq && apt_get install -y -qq --no-install-recommends "$@"; }; then
    echo "$(basename "$0"): apt-get failed; $what will be skipped" >&2
fi
exit 0
