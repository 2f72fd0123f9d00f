#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md in one go and writes
# docs/bench/results.json and docs/bench/latency.svg:
#
#     scripts/bench.sh                               # everything, reconcile at 200k keys
#     scripts/bench.sh --reconcile-keys 1000000      # reconcile at full size
#     scripts/bench.sh --only write,latency          # a subset
#
# Starts its own throwaway PostgreSQL with fsync and synchronous_commit ON
# (honest write-path numbers), fetches the SpiceDB library, builds the
# release binaries, and passes any arguments on to the `bench` program
# (`bench --help` lists them).
#
# Environment: CARGO_TARGET_DIR (default target-bench, so a bench build does
# not disturb other builds).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-bench}
export PG_FSYNC=on PG_SYNCHRONOUS_COMMIT=on
# pg_stat_statements gives the host-writes benchmark its database time per
# write; wal_level = logical lets the wal-mode variants (`migrate --capture
# wal`, issue 24) run on the same cluster as table mode, so every variant
# runs on that level and their WAL bytes compare. Extra lines come through
# PG_EXTRA_CONF as for scripts/pg.sh.
PG_EXTRA_CONF="shared_preload_libraries = 'pg_stat_statements'
wal_level = logical
max_replication_slots = 16
${PG_EXTRA_CONF:-}"
export PG_EXTRA_CONF

SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)
export SPICEDB_LIBRARY_PATH

cargo build --release -p authz-outbox-proof --bin bench \
    -p authz-outbox --bin authz-outbox -p agentex-auth-dev --bin agentex-auth-dev >&2

# shellcheck source=scripts/pg.sh
source scripts/pg.sh
pg_start

"$CARGO_TARGET_DIR/release/bench" --bin-dir "$CARGO_TARGET_DIR/release" "$@"
