import subprocess
import sys

GEO_MODULES = ("geopandas", "shapely", "pyogrio", "pyproj", "osgeo")


def test_definitions_import_no_geo_library():
    """The orchestration layer (and the CLI, the run launcher the daemon and the
    webserver load, and the public API of steps of one's own: geo_asset,
    build_definitions, the pool) must not load GDAL, GEOS or PROJ."""
    code = (
        "import sys, geoiso_dagster.definitions, geoiso_dagster.cli, geoiso_dagster.launcher;"
        "import geoiso_dagster, geoiso_dagster.pool, geoiso_dagster.components;"
        "geoiso_dagster.geo_asset, geoiso_dagster.build_definitions, geoiso_dagster.Reference;"
        f"print(','.join(m for m in {GEO_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"geo modules loaded by the orchestration layer: {out.stdout}"


def test_the_guard_can_fail():
    """The same probe does see a geo import when there is one."""
    code = (
        "import sys, geoiso_dagster.spatial.tasks;"
        f"print(','.join(m for m in {GEO_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "geopandas" in out.stdout
