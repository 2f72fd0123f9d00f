#!/usr/bin/env bash
# Issue 25's figures in one run: retention by partition drop against the
# DELETE path, the outbox's size after a simulated week, and the claim's
# latency with few and with many finished rows.
#
#     DATABASE_URL=postgres://... scripts/bench-retention.sh [ROWS] [PER_DAY] [ROUNDS]
#
# ROWS (default 7000000) finished rows per day in the retention run; PER_DAY
# (default 250000) rows per simulated day of the week run; ROUNDS (default 5)
# interleaved rounds wherever two variants are compared.
#
# Creates scratch databases next to DATABASE_URL's, migrated with the
# authz-outbox binary (AUTHZ_OUTBOX_BIN, default target/debug/authz-outbox;
# every figure here is PostgreSQL's work, the binary only migrates).
#
# 1. Retention. Three daily partitions of ROWS finished rows each:
#    day B is pruned the old way (1,000-row DELETE batches, each committed);
#    day C is dropped the way retention did before migration 20261206100001
#    (one transaction: check, DROP TABLE of the attached partition);
#    day A is retired the way the worker's housekeeping now does
#    (`partitions::drop_expired`: detach in one transaction, drop the
#    detached table in a second). A probe session inserts one capture row
#    every 5 ms throughout the two drops; its slowest insert during each is
#    how long retention held up the host's writes.
# 2. Claim p50: the worker's claim statement (src/outbox/claim.rs, 100 rows,
#    rolled back so the same 1,000 pending rows are claimed each time), in a
#    database with 10,000 finished rows and in the retention database with
#    3 x ROWS finished rows (before the drops), ROUNDS interleaved rounds of 50 claims each.
# 3. A week at 1,000 writes/s, compressed: PER_DAY rows per simulated day
#    for 8 days (1,000/s would be 86,400,000 a day), each row written as the
#    worker writes it (insert pending; claim update; delivered update; 1,000
#    rows a transaction, autovacuum on), retention run after each day with
#    7 days' retention. Then the outbox's size (tables + indexes) against
#    the same rows copied into a fresh table with the same indexes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-7000000}
PER_DAY=${2:-250000}
ROUNDS=${3:-5}
# SKIP: any of "delete claim week" to leave those parts out (the drops always run).
SKIP=${SKIP:-}
# COLD=1: before each drop, a CHECKPOINT, a sync and the kernel's page cache
# dropped (root only), so the day's files are as a day written a week ago
# finds them: on disk, clean, not cached. Without it the drops unlink files
# written seconds before, still in the page cache.
COLD=${COLD:-}
# VACUUM_EVERY=N: in the week run, vacuum the table the pending rows churn in
# after every N rows written. The week is compressed about 350x, so
# autovacuum, which visits a database once a minute of real time, sees a
# simulated day a few times instead of some 1,400; 60000 is its real
# cadence at 1,000 writes/s, about 1/1,440 of a real day; a simulated day
# of 250,000 rows keeps that proportion at 174 rows, so 1000 (every batch)
# is the closest the batches allow, and still 6x less often than real.
# Unset: autovacuum alone, as compressed.
VACUUM_EVERY=${VACUUM_EVERY:-}
# OLD_SHAPE=1: the week run's days in the shape before migration
# 20261207000001 (one table a day), for a side-by-side.
OLD_SHAPE=${OLD_SHAPE:-}
skip() { [[ " $SKIP " == *" $1 "* ]]; }
BIN=${AUTHZ_OUTBOX_BIN:-target/debug/authz-outbox}
base=${DATABASE_URL%/*}
db=bench_retention_$$
small=bench_claim_small_$$
week=bench_week_$$
probe_pid=
cleanup() {
  [ -n "$probe_pid" ] && kill "$probe_pid" 2>/dev/null || true
  for d in "$db" "$small" "$week"; do
    psql -qAt "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $d" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
for d in "$db" "$small" "$week"; do
  psql -qAt "$DATABASE_URL" -c "CREATE DATABASE $d"
  DATABASE_URL="$base/$d" "$BIN" migrate >/dev/null
done
url="$base/$db"
q() { psql -qAt -v ON_ERROR_STOP=1 "$url" "$@"; }
qd() { local d=$1; shift; psql -qAt -v ON_ERROR_STOP=1 "$base/$d" "$@"; }
# Sum of psql's "Time: N ms" lines on stdin, in ms.
summed() { awk '/^Time: /{s+=$2} END{printf "%.1f", s}'; }
# Median and min-max of numbers on stdin.
spread() { sort -g | awk '{v[NR]=$1} END{m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; printf "median %.2f (min %.2f, max %.2f, n=%d)", m, v[1], v[NR], NR}'; }

echo "== machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD)"

# ---------------------------------------------------------------- 1. retention
q -c "SELECT authz_outbox_create_partitions(6)" >/dev/null
# Days after today: the probe below writes into today's.
mapfile -t days < <(q -c "SELECT lower_bound FROM authz_outbox_partitions() WHERE name <> 'authz_outbox_legacy' AND NOT is_default AND lower_bound > now() ORDER BY lower_bound LIMIT 3")
a_lo=${days[0]} b_lo=${days[1]} c_lo=${days[2]}
echo "filling 3 x $ROWS finished rows (days $a_lo, $b_lo, $c_lo)" >&2
for lo in "$a_lo" "$b_lo" "$c_lo"; do
  if skip delete && [ "$lo" = "$b_lo" ]; then continue; fi
  q -c "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state,
            created_at, finished_at, delivered_at)
        SELECT 'task', 't' || g, 'register', '{\"user_id\":\"u\"}', 'delivered',
               '$lo'::timestamptz + (g % 82800000) * interval '1 millisecond',
               now() - interval '30 days', now() - interval '30 days'
        FROM generate_series(1, $ROWS) g"
done
q -c "VACUUM ANALYZE authz_outbox"
# -------------------------------------------------------------- 2. claim p50
if ! skip claim; then
# (the claim statement with its binds inlined: operation, limit, worker,
# lease ms, due_by)
claim_sql=$(sed -n '/^pub const CLAIM_SQL: &str = r#"/,/^"#;/p' src/outbox/claim.rs | sed '1d;$d' \
  | sed -e "s/\$1/'register'/g" -e 's/\$2/100/g' -e "s/\$3/'bench'/g" -e 's/\$4/30000/g' -e 's/\$5/NULL::timestamptz/g' -e "s/\$6/'register'/g")
# The same days created ahead as the retention database: a claim's cost
# grows with the number of partitions, which is not the question here.
qd "$small" -c "SELECT authz_outbox_create_partitions(6)" >/dev/null
qd "$small" -c "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state, finished_at, delivered_at)
    SELECT 'task', 'f' || g, 'register', '{\"user_id\":\"u\"}', 'delivered', now(), now() FROM generate_series(1, 10000) g" >/dev/null
for d in "$small" "$db"; do
  qd "$d" -c "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
         SELECT 'task', 'c' || g, 'register', '{\"user_id\":\"u\"}' FROM generate_series(1, 1000) g" \
     -c "VACUUM ANALYZE authz_outbox" >/dev/null
done
finished_big=$(q -c "SELECT count(*) FROM authz_outbox WHERE state = 'delivered'")
echo "claims: 10,000 vs $finished_big finished rows, partitions $(qd "$small" -c "SELECT count(*) FROM authz_outbox_partitions()") vs $(q -c "SELECT count(*) FROM authz_outbox_partitions()")" >&2
claims() {
  { echo '\timing on'; for _ in $(seq 1 50); do echo "BEGIN;"; echo "$claim_sql;"; echo "ROLLBACK;"; done; } \
    | qd "$1" | awk '/^Time: /{n++; if (n%3==2) print $2}'
}
small_all=$(mktemp) big_all=$(mktemp)
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="$small $db"; else order="$db $small"; fi
  for d in $order; do
    qd "$d" -c "VACUUM authz_outbox" >/dev/null
    out=$(claims "$d")
    med=$(echo "$out" | spread | awk '{print $2}')
    if [ "$d" = "$small" ]; then echo "$med" >>"$small_all"; else echo "$med" >>"$big_all"; fi
  done
done
echo "== 2. claim (100 of 1,000 pending rows), $ROUNDS interleaved rounds of 50; per-round medians:"
echo "10,000 finished rows:            $(spread <"$small_all") ms"
echo "$finished_big finished rows:  $(spread <"$big_all") ms"
rm -f "$small_all" "$big_all"
fi

part() { q -c "SELECT name FROM authz_outbox_partitions() WHERE lower_bound = '$1'"; }
part_a=$(part "$a_lo") part_b=$(part "$b_lo") part_c=$(part "$c_lo")
bytes_a=$(q -c "SELECT bytes FROM authz_outbox_partitions() WHERE name = '$part_a'")

delete_ms=skipped dead_b=-
if ! skip delete; then
delete_ms=$(q <<SQL | summed
CREATE PROCEDURE pg_temp.prune_b() LANGUAGE plpgsql AS \$\$
DECLARE n bigint;
BEGIN
  LOOP
    DELETE FROM authz_outbox
    WHERE id IN (SELECT id FROM authz_outbox
                 WHERE state IN ('delivered', 'superseded')
                   AND finished_at < now() - interval '7 days'
                   AND created_at >= '$b_lo' AND created_at < '$b_lo'::timestamptz + interval '1 day'
                 LIMIT 1000 FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS n = ROW_COUNT;
    COMMIT;
    EXIT WHEN n = 0;
  END LOOP;
END \$\$;
\timing on
CALL pg_temp.prune_b();
SQL
)
sleep 1
# A day split by state is a partitioned table: its tuples are in its halves.
dead_b=$(q -c "SELECT coalesce(sum(s.n_dead_tup), 0) FROM pg_partition_tree('$part_b') t
               JOIN pg_stat_user_tables s ON s.relid = t.relid WHERE t.isleaf")
fi
# Day B is empty now: out of the drops' way.
q -c "ALTER TABLE authz_outbox DETACH PARTITION $part_b" >/dev/null

# The probe: one capture-like insert every 5 ms, each timed.
probe_log=$(mktemp) probe_sql=$(mktemp)
{ echo '\timing on'; for _ in $(seq 1 100000); do
    echo "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, next_attempt_at) VALUES ('probe', 'p', 'register', '{\"user_id\":\"u\"}', statement_timestamp());"
    echo "SELECT pg_sleep(0.005);"
  done; } >"$probe_sql"
psql -qAt "$url" -f "$probe_sql" >"$probe_log" 2>&1 </dev/null &
probe_pid=$!
sleep 2
# Each probe row holds its statement's start (next_attempt_at) and the time
# it was formed, after its locks (created_at): the slowest probe insert that
# started between two instants (epoch seconds from `mark`).
mark() { date +%s.%N; }
probe_max() {
  q -c "SELECT coalesce(round(max(extract(epoch FROM created_at - next_attempt_at) * 1000)::numeric, 1), 0)
        FROM authz_outbox WHERE resource_type = 'probe'
          AND next_attempt_at BETWEEN to_timestamp($1) AND to_timestamp($2)"
}

cool() {
  [ -n "$COLD" ] || return 0
  q -c "CHECKPOINT" >/dev/null
  sync
  if ! { echo 1 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
    echo "COLD=1: cannot drop the page cache (not root?); the files are only clean" >&2
  fi
}

# Day C the old way: check and DROP of the attached partition, one transaction.
cool
m0=$(mark)
old_ms=$(q <<SQL | summed
\timing on
BEGIN;
SET LOCAL lock_timeout = '2s';
LOCK TABLE $part_c IN ACCESS EXCLUSIVE MODE;
SELECT EXISTS (SELECT 1 FROM $part_c WHERE state = 'pending' AND operation = 'register')
    OR EXISTS (SELECT 1 FROM $part_c WHERE state = 'pending' AND operation = 'deregister')
    OR EXISTS (SELECT 1 FROM $part_c WHERE state = 'dead')
    OR EXISTS (SELECT 1 FROM $part_c WHERE state IN ('delivered', 'superseded') AND finished_at >= now() - interval '7 days');
DROP TABLE $part_c;
COMMIT;
SQL
)
m0e=$(mark)
sleep 1
old_probe=$(probe_max "$m0" "$m0e")

# Day A the new way: partitions::drop_expired's two transactions. The
# retention puts day A (and the empty pre-upgrade partition) past it, not
# the later days.
ret="now() - '$b_lo'::timestamptz"
cool
m1=$(mark)
detach_ms=$(q <<SQL | summed
\timing on
BEGIN;
SELECT set_config('lock_timeout', '2s', true);
SELECT authz_outbox_drop_partitions($ret);
COMMIT;
SQL
)
m2=$(mark)
files_ms=$(q <<SQL | summed
\timing on
BEGIN;
SELECT set_config('lock_timeout', '2s', true);
SELECT authz_outbox_drop_retired();
COMMIT;
SQL
)
m2e=$(mark)
sleep 1
detach_probe=$(probe_max "$m1" "$m2")
files_probe=$(probe_max "$m2" "$m2e")
baseline_probe=$(q -c "SELECT extract(epoch FROM created_at - next_attempt_at) * 1000 FROM authz_outbox
                       WHERE resource_type = 'probe' AND next_attempt_at < to_timestamp($m0)" | spread)
kill "$probe_pid" 2>/dev/null || true; probe_pid=
gone=$(q -c "SELECT count(*) FROM pg_class WHERE relname IN ('$part_a', '${part_a}_retired', '$part_c')")

echo "== 1. retention, $ROWS finished rows a day${COLD:+ (COLD: files clean and not cached before each drop)} ($((bytes_a / 1048576)) MiB, $((bytes_a / ROWS)) B/row with indexes)"
echo "DELETE path (day B, 1,000-row batches):            ${delete_ms} ms, $dead_b dead tuples left"
echo "one-transaction drop (day C, before 20261206100001): ${old_ms} ms; slowest capture meanwhile ${old_probe} ms"
echo "detach (day A, the outbox's lock):                  ${detach_ms} ms; slowest capture meanwhile ${detach_probe} ms"
echo "drop of the detached day (no outbox lock):          ${files_ms} ms; slowest capture meanwhile ${files_probe} ms"
echo "capture probe before the drops:                     $baseline_probe ms"
echo "tables left of days A and C: $gone; dead tuples of the drop path: 0 (files unlinked)"
rm -f "$probe_log" "$probe_sql"

# ---------------------------------------------------------------- 3. a week
skip week && exit 0
if [ -n "$OLD_SHAPE" ]; then
  # The days as the release before 20261207000001 made them: one table a
  # day, pending and finished rows together (fillfactor 70).
  qd "$week" <<'SQL' >/dev/null
DO $$
DECLARE p record; lo timestamptz; hi timestamptz; part text;
BEGIN
  FOR p IN SELECT name FROM authz_outbox_partitions() q
           JOIN pg_class c ON c.oid = to_regclass(quote_ident(q.name)) WHERE c.relkind = 'p' LOOP
    EXECUTE format('DROP TABLE %I', p.name);
  END LOOP;
  SELECT max(upper_bound) INTO lo FROM authz_outbox_partitions() WHERE NOT is_default;
  FOR i IN 1..13 LOOP
    hi := lo + interval '1 day';
    part := 'authz_outbox_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD');
    EXECUTE format('CREATE TABLE %I (LIKE authz_outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (id)) WITH (fillfactor = 70)', part);
    PERFORM authz_outbox_index_partition(part);
    EXECUTE format('ALTER TABLE authz_outbox ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    lo := hi;
  END LOOP;
END $$;
SQL
fi
qd "$week" -c "SELECT authz_outbox_create_partitions(12)" >/dev/null
first=$(qd "$week" -c "SELECT min(lower_bound) FROM authz_outbox_partitions() WHERE name <> 'authz_outbox_legacy' AND NOT is_default")
echo "simulating 8 days x $PER_DAY rows from $first${VACUUM_EVERY:+, the table of pending rows vacuumed every $VACUUM_EVERY rows}${OLD_SHAPE:+ (old shape: one table a day)}" >&2
week_start=$(date +%s)
qd "$week" <<'SQL' >/dev/null
-- Rows c0*1000 .. (c1+1)*1000 of day d, each written as the worker writes
-- it: inserted pending, leased, delivered; 1,000 rows a transaction. Each
-- row's resource id is a random UUID, as the host's are (runs before
-- 2026-12-06 13:00Z used sequential ids, which split the resource index
-- worse).
CREATE PROCEDURE bench_simulate(first timestamptz, d integer, c0 integer, c1 integer, per_day integer)
LANGUAGE plpgsql AS $$
DECLARE
  c integer; lo timestamptz := first + d * interval '1 day'; lo_id bigint; hi_id bigint;
BEGIN
  FOR c IN c0..c1 LOOP
    WITH ins AS (
      INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, created_at)
      SELECT 'task', gen_random_uuid()::text, 'register', '{"user_id":"u"}',
             lo + ((c * 1000 + g - 1)::float8 / per_day) * interval '1 day'
      FROM generate_series(1, 1000) g
      RETURNING id)
    SELECT min(id), max(id) INTO lo_id, hi_id FROM ins;
    COMMIT;
    UPDATE authz_outbox SET locked_by = 'w', locked_until = created_at + interval '30 s',
                            lease_token = gen_random_uuid(), attempts = attempts + 1
    WHERE state = 'pending' AND operation = 'register' AND id BETWEEN lo_id AND hi_id;
    COMMIT;
    UPDATE authz_outbox SET state = 'delivered', delivered_at = created_at + interval '5 ms',
                            finished_at = created_at + interval '5 ms', locked_by = NULL,
                            locked_until = NULL, last_status = 200
    WHERE state = 'pending' AND operation = 'register' AND id BETWEEN lo_id AND hi_id;
    COMMIT;
  END LOOP;
END $$;
SQL
batches=$((PER_DAY / 1000))
chunk=$(( ${VACUUM_EVERY:-$PER_DAY} / 1000 )); [ "$chunk" -ge 1 ] || chunk=1
for d in 0 1 2 3 4 5 6 7; do
  for ((c = 0; c < batches; c += chunk)); do
    last=$(( c + chunk - 1 < batches - 1 ? c + chunk - 1 : batches - 1 ))
    qd "$week" -c "CALL bench_simulate('$first', $d, $c, $last, $PER_DAY)" >/dev/null
    if [ -n "$VACUUM_EVERY" ]; then
      # What autovacuum does once a minute at the real rate (1,000/s: a
      # minute is 60,000 rows): vacuum the table the pending rows churn in,
      # the day's open half (or, in the old shape, the day).
      leaf=$(qd "$week" -c "SELECT p.name || CASE WHEN c.relkind = 'p' THEN '_open' ELSE '' END
                            FROM authz_outbox_partitions() p
                            JOIN pg_class c ON c.oid = to_regclass(quote_ident(p.name))
                            WHERE p.lower_bound = '$first'::timestamptz + $d * interval '1 day'")
      qd "$week" -c "VACUUM $leaf" >/dev/null
    fi
  done
  # The day is over: retention (7 days) as the housekeeping runs it.
  qd "$week" -c "SELECT authz_outbox_drop_partitions(now() - ('$first'::timestamptz + ($d + 1) * interval '1 day' - interval '7 days'))" >/dev/null
  qd "$week" -c "SELECT authz_outbox_drop_retired()" >/dev/null
done
week_secs=$(( $(date +%s) - week_start ))
qd "$week" -c "ANALYZE authz_outbox" >/dev/null
qd "$week" <<'SQL' >/dev/null
CREATE TABLE fresh (LIKE authz_outbox INCLUDING DEFAULTS);
INSERT INTO fresh SELECT * FROM authz_outbox;
ALTER TABLE fresh ADD PRIMARY KEY (id);
CREATE INDEX ON fresh (operation, id) WHERE state = 'pending';
CREATE INDEX ON fresh (resource_type, resource_id, id);
CREATE INDEX ON fresh (finished_at) WHERE state = 'dead';
CREATE INDEX ON fresh (finished_at) WHERE state IN ('delivered', 'superseded');
SQL
read -r live_rows days_left outbox_bytes outbox_heap < <(qd "$week" -F' ' -c "
  SELECT (SELECT count(*) FROM authz_outbox),
         (SELECT count(*) FROM authz_outbox_partitions() p WHERE NOT is_default AND name <> 'authz_outbox_legacy'
            AND EXISTS (SELECT 1 FROM authz_outbox o WHERE o.created_at >= p.lower_bound AND o.created_at < p.upper_bound)),
         (SELECT sum(bytes) FROM authz_outbox_partitions()),
         (SELECT sum(pg_relation_size(t.relid)) FROM authz_outbox_partitions() p
            CROSS JOIN LATERAL pg_partition_tree(quote_ident(p.name)::regclass) t WHERE t.isleaf)")
read -r fresh_bytes fresh_heap tuple_bytes < <(qd "$week" -F' ' -c "
  SELECT pg_total_relation_size('fresh'), pg_relation_size('fresh'), (SELECT sum(pg_column_size(f.*)) FROM fresh f)")
echo "== 3. a simulated week: 8 days x $PER_DAY rows, 7 days' retention ($week_secs s to simulate)"
echo "rows left: $live_rows in $days_left days"
echo "outbox (partitions, tables + indexes): $((outbox_bytes / 1048576)) MiB (heap $((outbox_heap / 1048576)) MiB)"
echo "same rows, fresh table, same indexes:  $((fresh_bytes / 1048576)) MiB (heap $((fresh_heap / 1048576)) MiB); tuples alone $((tuple_bytes / 1048576)) MiB"
awk -v a="$outbox_bytes" -v b="$fresh_bytes" -v h="$outbox_heap" -v fh="$fresh_heap" \
  'BEGIN{printf "ratio outbox / fresh: %.2fx (heap alone %.2fx)\n", a/b, h/fh}'
