"""The environment every worker gets before any geo library loads.

GDAL, PROJ and the BLAS/Arrow thread pools read these when they initialise, so they
must be in the worker's environment before `import pyogrio` or `import pyproj` runs:
the forkserver that workers are forked from is started with them, and each worker
applies them again (plus GDAL's own config options) in its initializer.
"""

from geoiso_dagster import dataroot

# One thread each: the pool already runs one worker per core, and GDAL's or Arrow's
# own threads on top of that only oversubscribe the machine.
_SINGLE_THREADED = {
    "GDAL_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

DEFAULT_WORKER_ENV: dict[str, str] = {
    **_SINGLE_THREADED,
    # Never download grids at run time: results must not depend on the network.
    "PROJ_NETWORK": "OFF",
    # Keep features that only partly reproject instead of failing the whole layer;
    # the reproject task then rejects non-finite coordinates with a clear error.
    "OGR_ENABLE_PARTIAL_REPROJECTION": "YES",
    "CPL_DEBUG": "OFF",
    # glibc keeps one malloc arena per thread by default; two is plenty here and
    # keeps RSS (which the memory ceiling watches) close to what is really used.
    "MALLOC_ARENA_MAX": "2",
    # Arrow's own allocator (mimalloc) keeps freed memory for reuse; the system one
    # gives it back. Measured at 1M polygons: a dissolve part peaked 80 MB lower, as fast.
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    # The source jail (spatial/sources.py, gdal_jail.py): no GDAL plugin drivers, no
    # /vsicurl/, /vsis3/ (or other network file) access, no SQLite access outside the
    # database. GDAL opens a network name only if it ends with an entry of this list, and
    # none ends so; a source of an S3 root opens its own objects while it is read
    # (spatial/remote.py).
    "GDAL_DRIVER_PATH": "disable",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": "/geoiso/network-access-is-off",
    "OGR_SQLITE_ALLOW_EXTERNAL_ACCESS": "NO",
    # GDAL's persistent auxiliary metadata: opening a GeoPackage (a raster-capable driver)
    # looks for <name>.aux.xml and <name>.aux / <stem>.aux beside it and opens them, a
    # link out of the root or a FIFO alike. Nothing here reads or writes them.
    "GDAL_PAM_ENABLED": "NO",
}

# Variables GDAL reads through CPLGetConfigOption: applied with
# pyogrio.set_gdal_config_options (and osgeo.gdal.SetConfigOption) as well.
GDAL_CONFIG_PREFIXES = ("GDAL_", "CPL_", "OGR_", "OSR_", "SHAPE_", "GPKG_")


def worker_env(
    gdal_cachemax_mb: int, overrides: dict[str, str] | None = None, data_root: str | None = None
) -> dict[str, str]:
    """The full worker environment: defaults, the GDAL block cache size, the data root
    (the jail every source must stay in; default: this process's), then overrides."""
    env = dict(DEFAULT_WORKER_ENV)
    env["GDAL_CACHEMAX"] = str(int(gdal_cachemax_mb))
    root = dataroot.parse_root(data_root) if data_root else dataroot.root()
    env[dataroot.DATA_ROOT_ENV] = root.uri
    env.update(overrides or {})
    return env


def gdal_config_options(env: dict[str, str]) -> dict[str, str]:
    """The part of a worker environment that is GDAL configuration."""
    return {k: v for k, v in env.items() if k.startswith(GDAL_CONFIG_PREFIXES)}
