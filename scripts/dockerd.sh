#!/usr/bin/env bash
# A Docker engine for the deployment and the tests, when none is running.
#
#   scripts/dockerd.sh start PIDFILE LOG   start dockerd unless one answers already
#                                          (then PIDFILE is not written)
#   scripts/dockerd.sh stop PIDFILE        stop the dockerd that `start` started
#
# Host networking only: no bridge, no iptables rules (the bridge's private addresses
# are not allowed on these machines). Root only; Debian's docker.io.
set -euo pipefail
case ${1:-} in
start)
    pidfile=${2:?pidfile} log=${3:?log}
    docker info >/dev/null 2>&1 && exit 0
    [ "$(id -u)" = 0 ] || { echo "dockerd.sh: no Docker engine answers, and only root may start one" >&2; exit 1; }
    command -v dockerd >/dev/null || { echo "dockerd.sh: no dockerd (apt-get install docker.io)" >&2; exit 1; }
    setsid dockerd --bridge=none --iptables=false --ip6tables=false >"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && exit 0; sleep 0.5; done
    echo "dockerd.sh: dockerd did not answer within 60 s; see $log" >&2
    exit 1
    ;;
stop)
    pidfile=${2:?pidfile}
    [ -f "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    ;;
*) echo "usage: dockerd.sh start PIDFILE LOG | stop PIDFILE" >&2; exit 2 ;;
esac
