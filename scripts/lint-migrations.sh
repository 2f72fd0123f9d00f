#!/usr/bin/env bash
# The migration linter, as the host's CI runs it: squawk over every
# migration file, and over `authz-outbox migrate --print-sql` for the
# built-in mappings on the host's schema (the SQL a host embeds in its own
# alembic migration). Findings that are accepted carry a `squawk-ignore`
# comment with the reason next to the statement.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pg.sh
source scripts/pg.sh

SQUAWK_VERSION=2.70.0
venv="${XDG_CACHE_HOME:-$HOME/.cache}/authz-outbox/squawk-$SQUAWK_VERSION"
if [ ! -x "$venv/bin/squawk" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "squawk-cli==$SQUAWK_VERSION"
fi
squawk() { "$venv/bin/squawk" --pg-version=15 --reporter gcc "$@"; }

echo "lint-migrations: squawk $SQUAWK_VERSION over migrations/*.sql" >&2
squawk migrations/*.sql

bin=${AUTHZ_OUTBOX_BIN:-}
if [ -z "$bin" ]; then
  cargo build --quiet -p authz-outbox --bin authz-outbox
  bin=target/debug/authz-outbox
fi
pg_start
psql -q -v ON_ERROR_STOP=1 "$DATABASE_URL" -f tests/fixtures/host_schema.sql
out=$(mktemp -d)
"$bin" migrate --print-sql >"$out/print-sql.sql"
echo "lint-migrations: squawk over migrate --print-sql (built-in mappings, host schema)" >&2
squawk "$out/print-sql.sql"
rm -rf "$out"
echo "lint-migrations: clean" >&2
