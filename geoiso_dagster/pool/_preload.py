"""Imported once by the forkserver so that every forked worker starts warm.

Nothing here may touch GDAL or PROJ state beyond loading the libraries: the
forkserver has no data open and no threads, which is what makes forking from it safe.
"""

import geopandas  # noqa: F401
import pyarrow.parquet  # noqa: F401
import pyogrio  # noqa: F401
import pyproj  # noqa: F401
import shapely  # noqa: F401

import geoiso_dagster.spatial.tasks  # noqa: F401

try:  # the optional GDAL bindings: load them before the fork too, when installed
    from osgeo import gdal  # noqa: F401
except ImportError:
    pass
