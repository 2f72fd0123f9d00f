#!/usr/bin/env bash
# Runs every test against real parts: a throwaway PostgreSQL cluster started
# here (stopped on exit, even on failure) and the real SpiceDB engine
# (fetched and integrity-checked by scripts/fetch-spicedb.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pg.sh
source scripts/pg.sh

# The operator page's browser tests (tests/ui_browser.rs) drive Chromium
# through chromedriver, both from Debian's packages.
if ! command -v chromedriver >/dev/null 2>&1 && [ ! -x /usr/bin/chromedriver ]; then
  echo "test.sh: chromedriver not found; installing chromium and chromium-driver with apt-get" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >&2
fi

SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)
export SPICEDB_LIBRARY_PATH
# WAL capture's tests (tests/wal_capture.rs) read logical replication slots,
# one per test database.
PG_EXTRA_CONF=${PG_EXTRA_CONF:-$'wal_level = logical\nmax_replication_slots = 64\nmax_wal_senders = 16'}
export PG_EXTRA_CONF
pg_start
# Its wal_level test needs the opposite: a second, small cluster left at
# wal_level = replica, where `migrate --capture wal` must refuse. The main
# cluster's variables are put back after it.
main=("$DATABASE_URL" "$PG_DIR" "$PG_PORT" "$PG_EXTRA_CONF")
PG_EXTRA_CONF=$'wal_level = replica\nshared_buffers = 16MB\nmax_connections = 20'
pg_start
export WAL_REPLICA_DATABASE_URL=$DATABASE_URL
DATABASE_URL=${main[0]} PG_DIR=${main[1]} PG_PORT=${main[2]} PG_EXTRA_CONF=${main[3]}

cargo build --workspace --all-targets
# The quickstart guide's first block builds these (tests/guides.rs runs it
# as written); built here, that block finds them up to date.
cargo build --release --locked -p authz-outbox -p agentex-auth-dev
cargo test --workspace --no-fail-fast "$@"

# The Python host example (examples/python-host): its own virtual
# environment with pinned packages from PyPI, tests against this cluster and
# the debug binaries built above.
examples/python-host/run-tests.sh -q
