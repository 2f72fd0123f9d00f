#!/usr/bin/env bash
# Runs the Python example's checks and tests: a virtual environment with the
# pinned packages of requirements.txt (created once per requirements.txt
# content, under ${XDG_CACHE_HOME:-~/.cache}/authz-outbox), ruff, then pytest.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
#   SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh) \
#   examples/python-host/run-tests.sh [pytest args]
#
# Needs: CPython >= 3.11 with venv and pip, a PostgreSQL superuser URL in
# DATABASE_URL (each run creates and drops its own database and role), and
# the debug binaries `authz-outbox` and `agentex-auth-dev` (cargo build).
# scripts/test.sh provides all of it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

python=${PYTHON:-python3}
hash=$(sha256sum requirements.txt | cut -c1-16)
venv="${XDG_CACHE_HOME:-$HOME/.cache}/authz-outbox/venv-$hash"
# The marker is written last, so an interrupted install is never reused.
if [ ! -f "$venv/.installed" ]; then
  echo "python-host: creating $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  touch "$venv/.installed"
fi

"$venv/bin/python" -m ruff check --quiet .
"$venv/bin/python" -m ruff format --check --quiet .
"$venv/bin/python" -m pytest "$@"
