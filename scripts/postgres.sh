#!/usr/bin/env bash
# A PostgreSQL cluster of its own for the deployment and the tests, on 127.0.0.1 only.
#
#   scripts/postgres.sh up DIR PORT     initdb in DIR (first time), start, create the database
#   scripts/postgres.sh start|stop DIR  start or stop (fast) the cluster in DIR
#
# The connection is what deploy/dagster.yaml reads: DAGSTER_POSTGRES_USER,
# DAGSTER_POSTGRES_PASSWORD (required for `up`; never written to disk past initdb) and
# DAGSTER_POSTGRES_DB. The server refuses to run as root, so as root the cluster belongs
# to `nobody`. PostgreSQL comes from Debian's `postgresql` package.
set -euo pipefail
command=${1:?usage: postgres.sh up DIR PORT | start DIR | stop DIR}
dir=$(realpath -m "${2:?the cluster folder}")
data=$dir/data
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bindir/postgres" ] || { echo "postgres.sh: no PostgreSQL (apt-get install postgresql)" >&2; exit 1; }

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=nobody --regid=nogroup --clear-groups env HOME="$dir" "$@"
    else
        "$@"
    fi
}

start() {
    as_owner "$bindir/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 start >/dev/null
}

case $command in
up)
    port=${3:?the port}
    : "${DAGSTER_POSTGRES_PASSWORD:?set DAGSTER_POSTGRES_PASSWORD}"
    user=${DAGSTER_POSTGRES_USER:-geoiso} db=${DAGSTER_POSTGRES_DB:-dagster}
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown nobody:nogroup "$dir"
    chmod 700 "$dir"
    if [ ! -f "$data/PG_VERSION" ]; then
        pwfile=$(mktemp -p "$dir")
        trap 'rm -f "$pwfile"' EXIT
        printf '%s\n' "$DAGSTER_POSTGRES_PASSWORD" >"$pwfile"
        [ "$(id -u)" = 0 ] && chown nobody:nogroup "$pwfile"
        as_owner "$bindir/initdb" -D "$data" -U "$user" --pwfile="$pwfile" \
            --auth-host=scram-sha-256 --auth-local=scram-sha-256 -E UTF8 --no-instructions >/dev/null
        rm -f "$pwfile"
        {
            echo "listen_addresses = '127.0.0.1'"
            echo "port = $port"
            echo "unix_socket_directories = '$dir'"
            echo "max_connections = 200"
            echo "fsync = on"
        } >>"$data/postgresql.conf"
    fi
    start
    PGPASSWORD=$DAGSTER_POSTGRES_PASSWORD "$bindir/psql" -h 127.0.0.1 -p "$port" -U "$user" \
        -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
        PGPASSWORD=$DAGSTER_POSTGRES_PASSWORD "$bindir/createdb" -h 127.0.0.1 -p "$port" -U "$user" "$db"
    ;;
start) start ;;
stop) as_owner "$bindir/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null ;;
*) echo "postgres.sh: unknown command $command" >&2; exit 2 ;;
esac
