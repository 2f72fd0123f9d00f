#!/usr/bin/env bash
# Retention by partition drop against the DELETE path, in one run (issue 25):
#
#     DATABASE_URL=postgres://... scripts/bench-retention.sh [ROWS]   # default 7000000
#
# Creates a scratch database next to DATABASE_URL's, migrates it with the
# authz-outbox binary (AUTHZ_OUTBOX_BIN, default target/debug/authz-outbox),
# fills two daily partitions with ROWS finished rows each, then
#   1. prunes day B the old way: 1,000-row DELETE batches, each committed,
#      as the worker did before partitions (the housekeeping's statement);
#   2. retires day A the new way: `authz_outbox_drop_partitions`, the call
#      the worker's housekeeping makes.
# Prints the worker-side time of each and the dead tuples each left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-7000000}
BIN=${AUTHZ_OUTBOX_BIN:-target/debug/authz-outbox}
base=${DATABASE_URL%/*}
db=bench_retention_$$
psql -qAt "$DATABASE_URL" -c "CREATE DATABASE $db"
trap 'psql -qAt "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $db" >/dev/null' EXIT
url="$base/$db"
DATABASE_URL=$url "$BIN" migrate >/dev/null
q() { psql -qAt -v ON_ERROR_STOP=1 "$url" "$@"; }

# Day A and day B: the first two partitions after the pre-upgrade range.
a_lo=$(q -c "SELECT min(lower_bound) FROM authz_outbox_partitions() WHERE name <> 'authz_outbox_legacy' AND NOT is_default")
b_lo=$(q -c "SELECT min(lower_bound) + interval '1 day' FROM authz_outbox_partitions() WHERE name <> 'authz_outbox_legacy' AND NOT is_default")
echo "filling 2 x $ROWS finished rows (days starting $a_lo and $b_lo)" >&2
for lo in "$a_lo" "$b_lo"; do
  q -c "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state,
            created_at, finished_at, delivered_at)
        SELECT 'task', 't' || g, 'register', '{\"user_id\":\"u\"}', 'delivered',
               '$lo'::timestamptz + (g % 82800000) * interval '1 millisecond',
               now() - interval '30 days', now() - interval '30 days'
        FROM generate_series(1, $ROWS) g"
done
q -c "VACUUM ANALYZE authz_outbox"
bytes_a=$(q -c "SELECT bytes FROM authz_outbox_partitions() WHERE lower_bound = '$a_lo'")
part_b=$(q -c "SELECT name FROM authz_outbox_partitions() WHERE lower_bound = '$b_lo'")

q <<SQL
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
\echo DELETE path (day B):
CALL pg_temp.prune_b();
\timing off
SQL
sleep 1
dead_b=$(q -c "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = '$part_b'")
# Day B is empty now: take it out of the drop's way so the drop below retires
# day A alone (and the empty pre-upgrade partition).
q -c "ALTER TABLE authz_outbox DETACH PARTITION $part_b" >/dev/null
# What the drop spends its time on: the checks alone (read-only), first.
part_a=$(q -c "SELECT name FROM authz_outbox_partitions() WHERE lower_bound = '$a_lo'")
checks=$(q <<SQL
\timing on
SELECT EXISTS (SELECT 1 FROM $part_a WHERE state = 'pending' AND operation = 'register')
    OR EXISTS (SELECT 1 FROM $part_a WHERE state = 'pending' AND operation = 'deregister')
    OR EXISTS (SELECT 1 FROM $part_a WHERE state = 'dead')
    OR EXISTS (SELECT 1 FROM $part_a WHERE state IN ('delivered', 'superseded') AND finished_at >= '$b_lo');
SQL
)
echo "checks alone: $checks" >&2
drop_out=$(q <<SQL
\timing on
SELECT authz_outbox_drop_partitions(now() - '$b_lo'::timestamptz);
SQL
)
echo "$drop_out" >&2
echo "rows per day:           $ROWS"
echo "day A size:             $((bytes_a / 1048576)) MiB ($((bytes_a / ROWS)) B/row)"
echo "DELETE path dead tuples: $dead_b"
echo "drop path dead tuples:   0 (the partition's files are unlinked)"
