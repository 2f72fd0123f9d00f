#!/usr/bin/env bash
# The chaos convergence run: ten thousand random key operations (creates,
# deletes by id / by name / by plain SQL, create-then-delete, re-parenting)
# against three `authz-outbox run` processes, while agentex-auth-dev injects
# 20% mixed faults (500/502/503/429, 1.5 s hangs past the 1 s request
# timeout, writes that commit and then answer 503), one worker is SIGKILLed
# and restarted every 3 s, and PostgreSQL restarts once half-way. Then, with
# the faults off, it waits for the outbox to drain and asserts: no pending
# row, no dead row, reconcile --grace 0s finds zero drift, every live key is
# readable by its creator (and not by another user), every deleted key is
# not. Prints a JSON summary; exits non-zero on any failed assertion.
#
#   scripts/chaos.sh                        # full size, debug build
#   scripts/chaos.sh --release              # full size, release build
#   scripts/chaos.sh --ops 2000 --keys 400  # any flag of the chaos program
#   scripts/chaos.sh --help                 # the program's flags
#
# A throwaway PostgreSQL cluster (scripts/pg.sh) is started and removed on
# exit; worker and server logs stay in the --log-dir (printed at start).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

profile=debug
build_flags=()
if [[ "${1:-}" == "--release" ]]; then
  profile=release
  build_flags=(--release)
  shift
fi

cargo build "${build_flags[@]}" -q -p authz-outbox --bin authz-outbox \
  -p agentex-auth-dev --bin agentex-auth-dev -p authz-outbox-proof --bin chaos
bin_dir="${CARGO_TARGET_DIR:-$root/target}/$profile"

for arg in "$@"; do
  if [[ "$arg" == "--help" || "$arg" == "-h" ]]; then
    exec "$bin_dir/chaos" --database-url unused --help
  fi
done

SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)
export SPICEDB_LIBRARY_PATH
# shellcheck source=scripts/pg.sh
source scripts/pg.sh
pg_start

# The program runs this once mid-run; PG_DIR and PG_BIN are exported by pg_start.
"$bin_dir/chaos" --bin-dir "$bin_dir" \
  --pg-restart-cmd "source '$root/scripts/pg.sh' && pg_restart" "$@"
