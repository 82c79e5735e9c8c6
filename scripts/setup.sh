#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine, idempotently.
#   scripts/setup.sh          the package and its dev tools in .venv
#   scripts/setup.sh --test   also what only the tests need, from Debian: libgdal-dev (for
#                             the optional osgeo bindings, built to match it), chromium
#                             (for the browser test, driven by Playwright), strace and
#                             unshare (storage and durability tests), and for the
#                             deployment's tests postgresql, docker.io and debootstrap
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--test" ]; then
    missing=()
    command -v gdal-config >/dev/null 2>&1 || missing+=(libgdal-dev)
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v strace >/dev/null 2>&1 || missing+=(strace)
    command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "setup: installing Debian's ${missing[*]}"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "setup: cannot apt-get ${missing[*]} here; their tests will skip" >&2
        fi
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install --upgrade pip
pip install -e ".[dev]"
.venv/bin/python -c "import dagster, geopandas, pebble" # fail here, not later, if the install did

if [ "${1:-}" = "--test" ] && command -v gdal-config >/dev/null 2>&1; then
    version=$(gdal-config --version)
    if ! .venv/bin/python -c "from osgeo import gdal; assert gdal.__version__ == '$version'" 2>/dev/null; then
        echo "setup: building the GDAL $version bindings against the system libgdal"
        pip install "GDAL==$version"
    fi
    .venv/bin/python -c "from osgeo import gdal; print('setup: osgeo', gdal.__version__)"
fi
