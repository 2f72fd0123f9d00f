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

echo "== 1. the application's tables, and rows it had before capture"
sql -f app.sql
sql <<'SQL'
INSERT INTO folders (id, name, owner_id) VALUES ('archive', 'Archive', 'carol');
INSERT INTO documents (id, folder_id, owner_id, title) VALUES ('minutes-2025', 'archive', 'carol', 'Minutes 2025');
SQL

echo "== 2. migrate: the outbox, and capture triggers from the mapping file"
"$ao" migrate

echo "== 3. check the mappings against the database and SpiceDB's schema"
"$ao" mappings check --spicedb-endpoint "$SPICEDB_ENDPOINT"

echo "== 4. the application writes, as it always does"
# Owners come from columns (`creator = []`): no principal to set.
sql <<'SQL'
INSERT INTO folders (id, name, owner_id) VALUES ('plans', 'Plans', 'alice');
INSERT INTO documents (id, folder_id, owner_id, title) VALUES
    ('roadmap', 'plans', 'alice', 'Roadmap'),
    ('notes',   'plans', 'bob',   'Meeting notes'),
    ('spec',    'plans', 'alice', 'Spec');
SQL

echo "== 5. deliver: relationships written to SpiceDB"
"$ao" run --once

echo "== 6. move a document to another folder, hand one to another user, delete one (softly)"
sql <<'SQL'
BEGIN;
INSERT INTO folders (id, name, owner_id) VALUES ('bobs', 'Bob''s', 'bob');
UPDATE documents SET folder_id = 'bobs' WHERE id = 'notes';
UPDATE documents SET owner_id = 'bob' WHERE id = 'spec';
UPDATE documents SET deleted_at = now() WHERE id = 'roadmap';
COMMIT;
SQL
"$ao" run --once

echo "== 7. backfill: register the rows that existed before capture"
# reconcile finds them `missing`; --apply enqueues their registers (exit 1:
# drift was found, and fixed through the outbox); run delivers them.
"$ao" reconcile --spicedb-endpoint "$SPICEDB_ENDPOINT" --grace 0s --apply || [ $? -eq 1 ]
"$ao" run --once

echo "== 8. look in SpiceDB: who may read what"
"$ao" check document:notes read user:bob --spicedb-endpoint "$SPICEDB_ENDPOINT"          # allowed: bob's folder
"$ao" check document:minutes-2025 read user:carol --spicedb-endpoint "$SPICEDB_ENDPOINT"  # allowed: backfilled
if "$ao" check document:roadmap read user:alice --spicedb-endpoint "$SPICEDB_ENDPOINT"; then  # denied: deleted
  echo "roadmap was deleted, yet alice may still read it" >&2
  exit 1
fi

echo "== 9. what the outbox did"
"$ao" status

echo "== 10. reconcile: SpiceDB against the tables, judged by the mapping's relationships"
# Exit 0: consistent; 1: drift found (--apply enqueues the fixes); 2: refused.
"$ao" reconcile --spicedb-endpoint "$SPICEDB_ENDPOINT" --grace 0s
