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
cargo test --workspace --no-fail-fast "$@"
