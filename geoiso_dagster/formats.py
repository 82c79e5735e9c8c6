"""The source formats this project reads: one allow-list for the sensor, the pool and the
workers. No geo imports.

Each format is chosen because it cannot reference another file or a URL: GeoPackage,
shapefile, GeoJSON (and GeoJSON sequences), FlatGeobuf, GeoParquet (read by Arrow), and
a `.zip` holding one of them (unpacked by the worker, never by GDAL's /vsizip/).
"""

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

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


def missing_shapefile_parts(name: str, present: Iterable[str]) -> list[str]:
    """The required parts (.shx, .dbf) a shapefile `name` lacks among the names
    `present` beside it, as GDAL looks them up; [] for any other format."""
    if not name.lower().endswith(".shp"):
        return []
    stem = name[: -len(".shp")]
    have = set(present)
    return [s for s in SHAPEFILE_REQUIRED if not have & set(part_names(stem, s))]


def pending_wal(name: str, sizes: Mapping[str, int]) -> int:
    """Bytes of changes a GeoPackage `name` holds in its SQLite write-ahead log, given
    the sizes of the files beside it by name (0: none, or not a GeoPackage). A GeoPackage
    in WAL mode keeps committed rows in `<file>-wal` until a checkpoint: the main file
    alone is stale, and a copy of it silently loses them. A checkpointed log (QGIS
    leaves these) is empty."""
    if not name.lower().endswith(".gpkg"):
        return 0
    return sizes.get(name + "-wal", 0)


def pending_wal_beside(path: Path) -> int:
    """pending_wal of a GeoPackage on a local disk: its -wal's size, read beside it (a
    link there counts by its own size: whether it may be opened is the jail's question)."""
    wal = path.with_name(path.name + "-wal")
    return pending_wal(path.name, {wal.name: wal.lstat().st_size if os.path.lexists(wal) else 0})


def wal_waits(name: str) -> str:
    """Why a GeoPackage with a pending log waits in the inbox."""
    return (
        f"{name}-wal holds changes not yet in the file (SQLite WAL); waits for a "
        "checkpoint (close the program writing it)"
    )


def wal_refusal(name: str, size: int) -> str:
    """Why a worker refuses a GeoPackage with a pending log, and the fix."""
    return (
        f"has un-checkpointed changes in {name}-wal (SQLite write-ahead log, {size} bytes); "
        f"close the program writing it, or run sqlite3 {name} 'PRAGMA wal_checkpoint"
        "(TRUNCATE)', then deliver the file again (a copy of the main file alone would be "
        "missing those rows)"
    )
