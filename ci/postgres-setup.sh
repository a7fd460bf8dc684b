#!/usr/bin/env bash
# Installs Debian's PostgreSQL for the Prefect-on-PostgreSQL test (tests/test_prefect_postgres.py)
# when missing (these machines have it; a fresh runner may not). Never fails CI: without it that
# test skips and says why.
exec bash "$(dirname "$0")/apt-install.sh" "the PostgreSQL test" \
    'compgen -G "/usr/lib/postgresql/*/bin/initdb"' postgresql
