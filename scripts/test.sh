#!/usr/bin/env bash
# Runs every test against real parts: a throwaway PostgreSQL cluster started
# here (stopped on exit, even on failure) and the real SpiceDB engine
# (fetched and integrity-checked by scripts/fetch-spicedb.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pg.sh
source scripts/pg.sh

SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)
export SPICEDB_LIBRARY_PATH
pg_start

cargo build --workspace --all-targets
# The quickstart guide's first block builds these (tests/guides.rs runs it
# as written); built here, that block finds them up to date.
cargo build --release --locked -p authz-outbox -p agentex-auth-dev
cargo test --workspace --no-fail-fast "$@"

# The Python host example (examples/python-host): its own virtual
# environment with pinned packages from PyPI, tests against this cluster and
# the debug binaries built above.
examples/python-host/run-tests.sh -q
