#!/usr/bin/env bash
# The production topology on this machine, on 127.0.0.1 (README "Deploy"):
#
#   scripts/stack.sh up     PostgreSQL, dockerd (when none runs), the image (when
#                           missing), the code server, the webserver, the daemon
#   scripts/stack.sh down   stop all of it: no process and no run container left
#
# State lives in $GEOISO_STACK_DIR (default .stack/, git-ignored): the Postgres cluster,
# DAGSTER_HOME (deploy/dagster.yaml), logs, pids. Ports: $GEOISO_WEBSERVER_PORT (3000),
# $GEOISO_CODE_SERVER_PORT (4266), $DAGSTER_POSTGRES_PORT (55432). The data root is
# $GEOISO_DATA_ROOT (default ./data), a folder or s3://bucket/prefix (README "Data in a
# bucket"); the inbox sensor is on.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
stack=$(realpath -m "${GEOISO_STACK_DIR:-.stack}")
web_port=${GEOISO_WEBSERVER_PORT:-3000}
code_port=${GEOISO_CODE_SERVER_PORT:-4266}
export DAGSTER_HOME=$stack/home
GEOISO_DATA_ROOT=${GEOISO_DATA_ROOT:-./data}
case $GEOISO_DATA_ROOT in
    s3://*) ;;  # a bucket: checked (and refused if unusable) when the code loads
    *://* | s3:*) echo "stack: GEOISO_DATA_ROOT=$GEOISO_DATA_ROOT is not a folder or s3://bucket/prefix" >&2; exit 2 ;;
    *) GEOISO_DATA_ROOT=$(realpath -m "$GEOISO_DATA_ROOT") ;;
esac
export GEOISO_DATA_ROOT
export DAGSTER_POSTGRES_HOST=127.0.0.1 DAGSTER_POSTGRES_PORT=${DAGSTER_POSTGRES_PORT:-55432}
export DAGSTER_POSTGRES_USER=${DAGSTER_POSTGRES_USER:-geoiso} DAGSTER_POSTGRES_DB=${DAGSTER_POSTGRES_DB:-dagster}
bin=$repo/.venv/bin

say() { echo "stack: $*"; }

# stop NAME: SIGTERM the process group in $stack/NAME.pid, SIGKILL what is left after 20 s.
stop() {
    local file=$stack/$1.pid pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    # The whole group: a child (the code server's gRPC process) outlives a dead leader.
    if kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        say "stopped $1 ($pid)"
    fi
    rm -f "$file"
}

# launch NAME COMMAND...: in a session of its own, output to $stack/NAME.log.
launch() {
    local name=$1
    shift
    setsid "$@" >"$stack/$name.log" 2>&1 </dev/null &
    echo $! >"$stack/$name.pid"
    say "started $name ($!), log $stack/$name.log"
}

in_use() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

up() {
    for port in "$web_port" "$code_port" "$DAGSTER_POSTGRES_PORT"; do
        if in_use "$port"; then
            say "127.0.0.1:$port is in use (a stack already up? scripts/stack.sh down)" >&2
            exit 1
        fi
    done
    mkdir -p "$stack/home"
    case $GEOISO_DATA_ROOT in s3://*) ;; *) mkdir -p "$GEOISO_DATA_ROOT/inbox" ;; esac
    chmod 711 "$stack"  # the cluster inside belongs to `nobody` when run as root
    [ -x "$bin/dagster" ] || scripts/setup.sh
    # The password is made once and kept for this stack only (0600, git-ignored).
    if [ -z "${DAGSTER_POSTGRES_PASSWORD:-}" ]; then
        [ -f "$stack/postgres.password" ] ||
            (umask 077 && "$bin/python" -c "import secrets; print(secrets.token_urlsafe(24))" >"$stack/postgres.password")
        DAGSTER_POSTGRES_PASSWORD=$(cat "$stack/postgres.password")
    fi
    export DAGSTER_POSTGRES_PASSWORD
    scripts/postgres.sh up "$stack/postgres" "$DAGSTER_POSTGRES_PORT"
    say "started PostgreSQL on 127.0.0.1:$DAGSTER_POSTGRES_PORT ($stack/postgres)"

    if ! docker info >/dev/null 2>&1; then
        scripts/dockerd.sh start "$stack/dockerd.pid" "$stack/dockerd.log"
        say "started dockerd ($(cat "$stack/dockerd.pid")), log $stack/dockerd.log"
    fi
    image=${GEOISO_IMAGE:-geoiso-dagster:latest}
    docker image inspect "$image" >/dev/null 2>&1 || IMAGE=$image scripts/image.sh

    cp deploy/dagster.yaml "$DAGSTER_HOME/dagster.yaml"
    # Make the instance's schema once, before three processes would each make it at the
    # same moment on a fresh database ("type instigators already exists", seen here).
    "$bin/dagster" instance migrate > "$stack/migrate.log" 2>&1 \
        || { cat "$stack/migrate.log" >&2; echo "stack: instance migrate failed" >&2; exit 1; }
    sed "s/port: 4266/port: $code_port/" deploy/workspace.yaml >"$stack/workspace.yaml"
    launch code-server "$bin/dagster" code-server start -h 127.0.0.1 -p "$code_port" \
        -m geoiso_dagster.definitions --location-name geoiso_dagster
    # A pooled connection is reused for 5 s at most (Dagster's default: an hour), so after
    # a Postgres restart the webserver reconnects instead of failing on a dead socket.
    launch webserver "$bin/dagster-webserver" -h 127.0.0.1 -p "$web_port" -w "$stack/workspace.yaml" \
        --db-pool-recycle 5
    launch daemon "$bin/dagster-daemon" run -w "$stack/workspace.yaml"

    local query='{"query":"{ workspaceOrError { ... on Workspace { locationEntries { loadStatus locationOrLoadError { __typename } } } } }"}'
    for _ in $(seq 1 180); do
        if curl -sf -H 'Content-Type: application/json' -d "$query" "http://127.0.0.1:$web_port/graphql" 2>/dev/null |
            grep -q '"__typename":"RepositoryLocation"'; then
            say "up: http://127.0.0.1:$web_port (data root $GEOISO_DATA_ROOT, inbox $GEOISO_DATA_ROOT/inbox)"
            return 0
        fi
        sleep 1
    done
    say "the webserver did not load the code location; logs in $stack" >&2
    exit 1
}

down() {
    for name in daemon webserver code-server; do stop "$name"; done
    if docker info >/dev/null 2>&1; then
        local containers
        containers=$(docker ps -aq --filter label=geoiso-dagster=run)
        [ -z "$containers" ] || { docker rm -f $containers >/dev/null; say "removed run containers"; }
    fi
    if [ -f "$stack/dockerd.pid" ]; then
        scripts/dockerd.sh stop "$stack/dockerd.pid" && say "stopped dockerd"
    fi
    if [ -f "$stack/postgres/data/postmaster.pid" ]; then
        scripts/postgres.sh stop "$stack/postgres" && say "stopped PostgreSQL"
    fi
    say "down"
}

case ${1:-} in
up) up ;;
down) down ;;
*) echo "usage: scripts/stack.sh up|down" >&2; exit 2 ;;
esac
