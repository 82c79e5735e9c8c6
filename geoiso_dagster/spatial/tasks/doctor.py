"""What a worker sees, for `geoiso doctor` and the environment tests."""

import os

import pyproj

from geoiso_dagster.spatial import io


def environment() -> dict:
    """What a worker sees: its environment, GDAL config, library versions. For `geoiso
    doctor` and the tests that check the environment reached GDAL before it loaded."""
    import pyogrio

    keys = ("GDAL_NUM_THREADS", "GDAL_CACHEMAX", "PROJ_NETWORK", "OGR_ENABLE_PARTIAL_REPROJECTION")
    facts = {
        "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in (*keys, "OMP_NUM_THREADS", "MALLOC_ARENA_MAX")},
        "gdal_config": {k: pyogrio.get_gdal_config_option(k) for k in keys},
        "proj_network": pyproj.network.is_network_enabled(),
        "gdal_drivers": sorted(pyogrio.list_drivers()),
        "versions": io.versions(),
    }
    try:
        from osgeo import gdal
    except ImportError:
        facts["osgeo"] = None
    else:
        facts["osgeo"] = {
            "version": gdal.__version__,
            "use_exceptions": bool(gdal.GetUseExceptions()),
            "cache_max_bytes": int(gdal.GetCacheMax()),
            "num_threads": gdal.GetConfigOption("GDAL_NUM_THREADS"),
        }
    return facts
