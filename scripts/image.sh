#!/usr/bin/env bash
# Build the image every run container starts from: `make image` -> geoiso-dagster:latest.
#
#   BASE   the base image (default debian:bookworm-slim, what users pull). When it is not
#          here and cannot be pulled (no registry reachable), a Debian bookworm base is
#          made with debootstrap --variant=minbase + docker import, tagged
#          geoiso-dagster-base:bookworm, and used instead.
#   IMAGE  the tag to build (default $GEOISO_IMAGE or geoiso-dagster:latest).
#
# pip inside a build may not reach the package index, so the wheels of the project and
# everything it needs are prepared here, on the host (build/wheels), and the Dockerfile
# installs them offline. apt inside the build uses the host network.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-debian:bookworm-slim}
IMAGE=${IMAGE:-${GEOISO_IMAGE:-geoiso-dagster:latest}}
started=$(date +%s)

docker info >/dev/null 2>&1 || { echo "image: no Docker engine answers (scripts/dockerd.sh start PIDFILE LOG starts one)" >&2; exit 1; }

if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! docker pull -q "$BASE" >/dev/null 2>&1; then
    if [ "$BASE" != debian:bookworm-slim ]; then
        echo "image: base $BASE is neither here nor pullable" >&2
        exit 1
    fi
    BASE=geoiso-dagster-base:bookworm
    if ! docker image inspect "$BASE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || {
            echo "image: no registry and no debootstrap (apt-get install debootstrap)" >&2
            exit 1
        }
        echo "image: no registry; making $BASE with debootstrap"
        rootfs=$(mktemp -d)
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    fi
fi

# The dependencies' wheels (build/wheels) and the project's (build/project) apart: the
# image installs them in two layers, so a code change rebuilds only the small one.
echo "image: wheels for the image in build/wheels and build/project"
rm -rf build/wheels build/project
mkdir -p build/wheels build/project
PIP=${PIP:-.venv/bin/python -m pip}
$PIP wheel --disable-pip-version-check -q --wheel-dir build/wheels . 2>&1 | grep -v "^WARNING: Location" || true
mv build/wheels/geoiso_dagster-*.whl build/project/

echo "image: docker build $IMAGE from $BASE"
docker build -q --network host --build-arg "BASE=$BASE" -t "$IMAGE" . >/dev/null
echo "image: $IMAGE built in $(( $(date +%s) - started )) s"
