#!/usr/bin/env bash
# The quickstart's commands (docs/quickstart-spicedb.md), in order, for the
# example app: folders and documents owned by users, kept in step with
# SpiceDB by authz-outbox. tests/spicedb_target.rs runs this very script.
#
#   DATABASE_URL=postgres://... SPICEDB_ENDPOINT=http://127.0.0.1:50051 \
#     examples/spicedb-app/quickstart.sh
#
# Needs psql and authz-outbox (on PATH, or AUTHZ_OUTBOX=/path/to/it); the
# schema (schema.zed) already in SpiceDB: `zed schema write schema.zed`, or
# agentex-auth-dev started with `--schema examples/spicedb-app/schema.zed`.
set -euo pipefail
cd "$(dirname "$0")"
: "${DATABASE_URL:?set DATABASE_URL}" "${SPICEDB_ENDPOINT:?set SPICEDB_ENDPOINT}"
ao=${AUTHZ_OUTBOX:-authz-outbox}
# Every authz-outbox command below reads these.
export AUTHZ_OUTBOX_TARGET=spicedb
AUTHZ_OUTBOX_MAPPINGS="$PWD/mappings.toml"
export AUTHZ_OUTBOX_MAPPINGS
sql() { psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }

echo "== 1. the application's tables"
sql -f app.sql

echo "== 2. migrate: the outbox, and capture triggers from the mapping file"
"$ao" migrate

echo "== 3. check the mappings against the database and SpiceDB's schema"
"$ao" mappings check --spicedb-endpoint "$SPICEDB_ENDPOINT"

echo "== 4. the application writes, as it always does (plus who is writing)"
sql <<'SQL'
BEGIN;
SELECT set_config('authz_outbox.principal', '{"user_id":"alice"}', true) \g /dev/null
INSERT INTO folders (id, name, owner_id) VALUES ('plans', 'Plans', 'alice');
INSERT INTO documents (id, folder_id, owner_id, title) VALUES
    ('roadmap', 'plans', 'alice', 'Roadmap'),
    ('notes',   'plans', 'bob',   'Meeting notes'),
    ('spec',    'plans', 'alice', 'Spec');
COMMIT;
SQL

echo "== 5. deliver: relationships written to SpiceDB"
"$ao" run --once

echo "== 6. move a document to another folder, hand one to another user, delete one (softly)"
sql <<'SQL'
BEGIN;
SELECT set_config('authz_outbox.principal', '{"user_id":"bob"}', true) \g /dev/null
INSERT INTO folders (id, name, owner_id) VALUES ('bobs', 'Bob''s', 'bob');
UPDATE documents SET folder_id = 'bobs' WHERE id = 'notes';
UPDATE documents SET owner_id = 'bob' WHERE id = 'spec';
UPDATE documents SET deleted_at = now() WHERE id = 'roadmap';
COMMIT;
SQL
"$ao" run --once

echo "== 7. what the outbox did"
"$ao" status

echo "== 8. reconcile: SpiceDB against the tables, judged by the mapping's relationships"
# Exit 0: consistent; 1: drift found (--apply enqueues the fixes); 2: refused.
"$ao" reconcile --spicedb-endpoint "$SPICEDB_ENDPOINT" --grace 0s
