"""The source formats this project reads: one allow-list for the sensor, the pool and the
workers. No geo imports.

Each format is chosen because it cannot reference another file or a URL: GeoPackage,
shapefile, GeoJSON (and GeoJSON sequences), FlatGeobuf, GeoParquet (read by Arrow), and
a `.zip` holding one of them (unpacked by the worker, never by GDAL's /vsizip/).
"""

# suffix -> the GDAL driver that must read it
GDAL_FORMATS = {
    ".shp": "ESRI Shapefile",
    ".gpkg": "GPKG",
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".geojsonl": "GeoJSONSeq",
    ".geojsons": "GeoJSONSeq",
    ".fgb": "FlatGeobuf",
}
PARQUET_SUFFIXES = (".parquet", ".geoparquet")
ARCHIVE_SUFFIXES = (".zip",)
# Every other GDAL driver is unregistered in the workers (gdal_jail.py).
ALLOWED_GDAL_DRIVERS = frozenset(GDAL_FORMATS.values())
SOURCE_SUFFIXES = (*GDAL_FORMATS, *PARQUET_SUFFIXES, *ARCHIVE_SUFFIXES)
# The parts of a shapefile GDAL may open beside the .shp: the .shp's exact stem, the
# suffix as written or in upper case.
SHAPEFILE_REQUIRED = (".shx", ".dbf")
SHAPEFILE_OPTIONAL = (".prj", ".cpg", ".qix", ".sbn", ".sbx", ".shp.xml")
SHAPEFILE_PARTS = SHAPEFILE_REQUIRED + SHAPEFILE_OPTIONAL
# Files SQLite opens beside a database (a GeoPackage).
SQLITE_PARTS = ("-wal", "-shm", "-journal")


def part_names(stem: str, suffix: str) -> tuple[str, str]:
    """How GDAL names a shapefile part: the exact stem, the suffix as written or upper."""
    return stem + suffix, stem + suffix.upper()


def companion_names(name: str) -> list[str]:
    """Names of the files beside source `name` that its format may open (exact stem)."""
    lower = name.lower()
    if lower.endswith(".shp"):
        stem = name[: -len(".shp")]
        return [n for part in SHAPEFILE_PARTS for n in part_names(stem, part)]
    if lower.endswith(".gpkg"):
        return [name + part for part in SQLITE_PARTS]
    return []
