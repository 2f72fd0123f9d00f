#!/usr/bin/env bash
# The capture's own cost per host write, in database time: one pgbench
# client, synchronous_commit off (so a transaction's latency is the
# backend's work and the round trips, not the WAL flush), the same write
# on three databases side by side, rounds interleaved:
#
#   plain  the host's tables, nothing installed;
#   table  `authz-outbox migrate` (table mode);
#   wal    `authz-outbox migrate --capture wal` (no relay reading the slot:
#          what the writing transaction itself pays).
#
#     DATABASE_URL=postgres://.../postgres scripts/bench-capture-cost.sh [ROUNDS] [SECS]
#
# Writes: key creation (BEGIN; set the principal; INSERT agent_api_keys;
# COMMIT) and task creation as the host makes it (tasks, task_agents,
# agent_task_tracker in one transaction). Prints each round's mean latency
# per transaction in µs, then the median per write and database.
# AUTHZ_OUTBOX_BIN defaults to target/release/authz-outbox. The scratch
# databases (capture_cost_*) are dropped first and left for inspection
# (the WAL one without its slot, which nothing reads).
# EXTRA="db1 db2" adds databases prepared by hand (e.g. migrated by an
# older binary, for a before/after comparison) to every round; each needs
# the host's tables and the agent 'bench-agent'.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL to a maintenance database URL}"
ROUNDS=${1:-4}
SECS=${2:-3}
BIN=${AUTHZ_OUTBOX_BIN:-target/release/authz-outbox}
base=${DATABASE_URL%/*}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for mode in plain table wal; do
  db=capture_cost_$mode
  psql "$DATABASE_URL" -qc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$db'" >/dev/null
  psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db" -qc "CREATE DATABASE $db"
  psql "$base/$db" -q -f tests/fixtures/host_schema.sql
  psql "$base/$db" -qc "INSERT INTO agents (id, name, description, status) VALUES ('bench-agent', 'bench-agent', '', 'READY')"
  case $mode in
    table) DATABASE_URL=$base/$db "$BIN" migrate >/dev/null ;;
    wal) DATABASE_URL=$base/$db "$BIN" migrate --capture wal >/dev/null 2>&1 ;;
  esac
done

cat >"$work/key.sql" <<'SQL'
BEGIN;
SELECT set_config('authz_outbox.principal', '{"user_id":"bench-user"}', true);
INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
VALUES (md5(random()::text || clock_timestamp()::text), 'bench-agent', 'k', 'INTERNAL', 'not-a-secret');
COMMIT;
SQL
cat >"$work/task.sql" <<'SQL'
\set r random(1, 1000000000)
BEGIN;
SELECT set_config('authz_outbox.principal', '{"user_id":"bench-user"}', true);
INSERT INTO tasks (id, name, status, params) VALUES ('t' || :r || '-' || txid_current(), 't' || :r || '-' || txid_current(), 'RUNNING', '{}');
INSERT INTO task_agents (task_id, agent_id) VALUES ('t' || :r || '-' || txid_current(), 'bench-agent');
INSERT INTO agent_task_tracker (id, agent_id, task_id, status) VALUES ('tr' || :r || '-' || txid_current(), 'bench-agent', 't' || :r || '-' || txid_current(), 'ACTIVE');
COMMIT;
SQL

dbs=(capture_cost_plain capture_cost_table capture_cost_wal ${EXTRA:-})
for write in key task; do
  for round in $(seq "$ROUNDS"); do
    for mode in "${dbs[@]}"; do
      url=$base/$mode
      # Each round starts from empty tables (the capture's triggers off
      # for it, so TRUNCATE captures nothing).
      psql "$url" -qc "SET session_replication_role = replica; TRUNCATE agent_api_keys, tasks, task_agents, agent_task_tracker" \
        -qc "DO \$\$BEGIN IF to_regclass('authz_outbox') IS NOT NULL THEN TRUNCATE authz_outbox; END IF; END\$\$" >/dev/null
      us=$(PGOPTIONS='-c synchronous_commit=off' pgbench -n -M prepared -c 1 -j 1 -T "$SECS" -f "$work/$write.sql" "$url" 2>&1 \
        | awk '/latency average/ {print $4 * 1000}')
      echo "$write $mode $round $us"
    done
  done
done | tee "$work/rounds.txt"
echo "median µs per transaction:"
for write in key task; do
  for mode in "${dbs[@]}"; do
    awk -v w="$write" -v m="$mode" '$1 == w && $2 == m {print $4}' "$work/rounds.txt" | sort -n \
      | awk -v w="$write" -v m="$mode" '{v[NR] = $1} END {med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s %s %.0f (min %.0f, max %.0f)\n", w, m, med, v[1], v[NR]}'
  done
done
# The WAL database's slot has no reader: drop it, or it keeps WAL forever.
psql "$DATABASE_URL" -qc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'capture_cost_wal'" >/dev/null
