#!/usr/bin/env bash
# Checks, builds and tests the Python package authz-outbox-host:
#
#  1. its version is the binary's (check_version.py: pyproject.toml and the
#     docs against Cargo.toml);
#  2. ruff, then `python -m build`: the sdist, and the wheel built from it;
#  3. the wheel installs in a fresh virtual environment with only
#     SQLAlchemy 2.0, and in one with only SQLAlchemy 2.1;
#  4. the tests, against the installed wheel (never this source tree), with
#     SQLAlchemy 2.0 on the oldest Python the package claims and with
#     SQLAlchemy 2.1 on the newest (check_version.py --pythons). A Python
#     the machine lacks is reported and replaced by the default one.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
#   SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh) \
#   examples/python-host/run-tests.sh [pytest args]
#
# Environments with the pinned packages of requirements-*.txt are created
# once per content and Python, under ${XDG_CACHE_HOME:-~/.cache}/authz-outbox,
# with pip's cache there too. Needs: CPython >= 3.11 with venv and pip (PYTHON,
# default python3), a PostgreSQL superuser URL in DATABASE_URL (each run
# creates and drops its own database and role), and the debug binaries
# `authz-outbox` and `agentex-auth-dev` (cargo build). scripts/test.sh
# provides all of it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

python=${PYTHON:-python3}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/authz-outbox"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install=(-m pip install --quiet)

"$python" check_version.py

# The interpreter for Python X.Y: pythonX.Y on PATH, else pyenv's.
find_python() {
  local want=$1 candidate
  for candidate in "python$want" "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/"$want".*/bin/"python$want"; do
    if "$candidate" -c "import sys, venv; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" \
      >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# A cached environment: venv DIR-NAME PYTHON REQUIREMENTS... prints its path.
venv() {
  local name=$1 py=$2 hash dir
  shift 2
  hash=$( ("$py" --version && cat "$@") | sha256sum | cut -c1-16)
  dir="$cache/venv-$name-$hash"
  # The marker is written last, so an interrupted install is never reused.
  if [ ! -f "$dir/.installed" ]; then
    echo "python-host: creating $dir" >&2
    rm -rf "$dir"
    "$py" -m venv "$dir"
    local reqs=()
    for r in "$@"; do reqs+=(-r "$r"); done
    "$dir/bin/python" "${pip_install[@]}" "${reqs[@]}"
    touch "$dir/.installed"
  fi
  echo "$dir"
}

tools=$(venv tools "$python" requirements-tools.txt)
"$tools/bin/ruff" check --quiet .
"$tools/bin/ruff" format --check --quiet .

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The sdist, then the wheel built from the sdist (so the sdist is complete).
"$tools/bin/python" -m build --no-isolation --outdir "$work/dist" . >"$work/build.log" 2>&1 ||
  { cat "$work/build.log" >&2; exit 1; }
wheel=$(echo "$work"/dist/authz_outbox_host-*.whl)
sdist=$(echo "$work"/dist/authz_outbox_host-*.tar.gz)
[ -f "$wheel" ] && [ -f "$sdist" ] || { echo "python-host: build made no wheel or sdist" >&2; exit 1; }
echo "python-host: built $(basename "$sdist") and $(basename "$wheel")" >&2

read -r oldest newest < <("$python" check_version.py --pythons)
matrix=()
for pair in "$oldest 2.0" "$newest 2.1"; do
  read -r version sqlalchemy <<<"$pair"
  if py=$(find_python "$version"); then
    matrix+=("$py $sqlalchemy")
  else
    echo "python-host: WARNING: no Python $version here; SQLAlchemy $sqlalchemy is tested on $("$python" --version) instead" >&2
    matrix+=("$python $sqlalchemy")
  fi
done

import_check='
import pathlib, sys, sqlalchemy, authz_outbox_host as p
where = pathlib.Path(p.__file__).resolve()
if pathlib.Path(sys.prefix).resolve() not in where.parents:
    sys.exit(f"imported {where}, not the installed wheel")
print(f"python-host: installed authz-outbox-host {p.__version__} with SQLAlchemy {sqlalchemy.__version__}")'

for entry in "${matrix[@]}"; do
  read -r py sqlalchemy <<<"$entry"
  requirements="requirements-sqlalchemy-$sqlalchemy.txt"
  pin=$(grep -E '^SQLAlchemy==' "$requirements")
  label="$("$py" --version), $pin"

  # A fresh environment: the wheel and what it declares, with this SQLAlchemy.
  fresh="$work/fresh-$sqlalchemy"
  "$py" -m venv "$fresh"
  "$fresh/bin/python" "${pip_install[@]}" "$wheel" "$pin"
  "$fresh/bin/python" -m pip check >/dev/null
  # Imported from elsewhere: `python -c` puts the working directory on sys.path.
  (cd "$work" && "$fresh/bin/python" -c "$import_check") >&2

  # The tests' environment: the wheel again, its dependencies resolved
  # against the pinned ones only (no index).
  env=$(venv "sqlalchemy-$sqlalchemy" "$py" requirements-test.txt "$requirements")
  "$env/bin/python" -m pip uninstall --quiet --yes authz-outbox-host 2>/dev/null || true
  "$env/bin/python" "${pip_install[@]}" --no-index -c "$requirements" "$wheel"
  "$env/bin/python" -m pip check >/dev/null
  echo "python-host: tests with $label" >&2
  # pytest from the environment's bin (not `python -m`, which would put this
  # source tree on sys.path); the tests check which package they import.
  AUTHZ_OUTBOX_HOST_EXPECT_SQLALCHEMY="$sqlalchemy" "$env/bin/pytest" -p no:cacheprovider "$@"
done
