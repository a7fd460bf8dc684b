#!/usr/bin/env bash
# Installs Debian's PostgreSQL for the Prefect-on-PostgreSQL test (tests/test_prefect_postgres.py)
# when missing (these machines have it; a fresh runner may not). Idempotent. Never fails CI:
# without PostgreSQL that test skips and says why.
set -uo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "postgres-setup: not root or no apt-get; the PostgreSQL test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt run (chromium, podman setup) instead of failing on the dpkg lock.
apt_get() { apt-get -o DPkg::Lock::Timeout=900 "$@"; }
if ! { apt_get update -qq && apt_get install -y -qq --no-install-recommends postgresql; }; then
    echo "postgres-setup: apt-get failed; the PostgreSQL test will be skipped" >&2
fi
exit 0
