# shellcheck shell=bash
# Throwaway PostgreSQL cluster for tests, the demo and benchmarks.
# Source this file, then call `pg_start`; it exports DATABASE_URL and
# PG_DIR and registers `pg_stop` on EXIT. `pg_restart` restarts the server.
# `pg_start` may be called again for a second cluster (another port and
# directory; DATABASE_URL and PG_DIR then name the last one): `pg_stop`
# stops every cluster started.
# PG_FSYNC / PG_SYNCHRONOUS_COMMIT (default off) and PG_EXTRA_CONF (lines
# appended to postgresql.conf, e.g. to preload pg_stat_statements) tune it.
#
# Installs the `postgresql` package with apt-get when no initdb is found.
# PostgreSQL refuses to run as root, so as root the cluster runs as the
# `postgres` user.

pg_find_bin() {
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    PG_BIN=$(dirname "$(readlink -f "$(command -v initdb)")")
    return 0
  fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
    PG_BIN=$dir
    return 0
  fi
  return 1
}

pg_install() {
  echo "pg.sh: initdb not found; installing postgresql with apt-get" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql >&2
}

pg_as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

pg_start() {
  pg_find_bin || { pg_install && pg_find_bin; } || { echo "pg.sh: no PostgreSQL binaries after install" >&2; return 1; }
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/false postgres
  fi
  PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/authz-outbox-pg.XXXXXX")
  [ "$(id -u)" -eq 0 ] && chown postgres "$PG_DIR"
  PG_STARTED_DIRS="${PG_STARTED_DIRS:-} $PG_DIR"
  # A port the caller chose is for the first cluster only.
  if [ -z "${PG_PORT:-}" ] || [ -n "${PG_PORT_STARTED:-}" ]; then
    PG_PORT=$(pg_free_port)
  fi
  PG_PORT_STARTED=1
  pg_as_owner "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; return 1; }
  # Durability is irrelevant for a throwaway cluster; speed is not.
  cat >>"$PG_DIR/data/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_DIR'
max_connections = 400
fsync = ${PG_FSYNC:-off}
synchronous_commit = ${PG_SYNCHRONOUS_COMMIT:-off}
full_page_writes = off
shared_buffers = 256MB
${PG_EXTRA_CONF:-}
CONF
  trap pg_stop EXIT
  pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 start >/dev/null \
    || { cat "$PG_DIR/server.log" >&2; return 1; }
  export PG_DIR PG_PORT PG_BIN
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "pg.sh: PostgreSQL running on 127.0.0.1:$PG_PORT ($PG_DIR)" >&2
}

pg_restart() {
  pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 -m fast restart >/dev/null
}

pg_stop() {
  local dir
  for dir in ${PG_STARTED_DIRS:-} ${PG_DIR:-}; do
    if [ -d "$dir/data" ]; then
      pg_as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
      rm -rf "$dir"
    fi
  done
}
