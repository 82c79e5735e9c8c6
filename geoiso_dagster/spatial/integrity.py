"""Checks that an input really holds what it says, where GDAL or pyarrow would not tell.

Each raises BadInputError naming the file and what is wrong with it.
"""

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pyproj
import shapely

from geoiso_dagster.errors import BadInputError, GeoisoError
from geoiso_dagster.spatial import io

_SHP_HEADER = 100
# Rows a Parquet file may declare per byte of file: a real feature takes several bytes
# even compressed; 20,000,000 rows declared in 150 KB (133 a byte) is a bomb.
MAX_PARQUET_ROWS_PER_BYTE = 4


def check_shapefile(shp: "Path | str") -> None:
    """The .shp, .shx and .dbf exist and are as long as their headers say."""
    shx, dbf = io.shapefile_part(shp, ".shx"), io.shapefile_part(shp, ".dbf")
    missing = [part for part, f in ((".shx (index)", shx), (".dbf (attributes)", dbf)) if not f]
    if missing:
        raise BadInputError(str(shp), f"shapefile is missing its {' and its '.join(missing)}")
    assert shx is not None and dbf is not None
    shp_size = io.size(shp)
    index = io.read_head(shx)
    if len(index) < _SHP_HEADER or (len(index) - _SHP_HEADER) % 8:
        raise BadInputError(str(shp), "its index (.shx) is truncated or corrupt")
    records = (len(index) - _SHP_HEADER) // 8
    _check_one_delivery(shp, io.read_head(shp, _SHP_HEADER), index[:_SHP_HEADER])
    entries = np.frombuffer(index, dtype=">i4", offset=_SHP_HEADER).reshape(-1, 2)
    starts = 2 * entries[:, 0].astype(np.int64)  # in 16-bit words, as the format counts
    ends = starts + 2 * entries[:, 1].astype(np.int64) + 8  # its 8-byte record header
    past_end = int((ends > shp_size).sum())
    if past_end:
        raise BadInputError(
            str(shp),
            f"is truncated: {past_end} of {records} records lie past its end ({shp_size} bytes)",
        )
    _check_index_order(shp, starts, ends)
    header = io.read_head(dbf, 12)
    if len(header) < 12:
        raise BadInputError(str(shp), "its attribute table (.dbf) is truncated")
    count, header_len, record_len = struct.unpack("<IHH", header[4:12])
    holds = max(0, (io.size(dbf) - header_len)) // record_len if record_len else 0
    if holds < count:
        raise BadInputError(
            str(shp), f"its .dbf declares {count} records but holds {holds} (it is truncated)"
        )
    if count != records:
        raise BadInputError(
            str(shp), f"its .shx indexes {records} shapes but its .dbf has {count} records"
        )


def _check_one_delivery(shp: "Path | str", head: bytes, index_head: bytes) -> None:
    """The .shx is the .shp's own: its header repeats the .shp's shape type and bounding
    box (bytes 32-100; only the file length differs). A delivery replaced part by part
    (A's .shp beside B's .shx and .dbf) published A's shapes with B's attributes, every
    check green."""
    if len(head) < _SHP_HEADER or head[32:_SHP_HEADER] != index_head[32:_SHP_HEADER]:
        raise BadInputError(
            str(shp),
            "its .shp and .shx are not one shapefile (their headers' shape type or bounding "
            "box differ): a delivery replaced part by part? Deliver its parts together",
        )


def _check_index_order(shp: "Path | str", starts: np.ndarray, ends: np.ndarray) -> None:
    """The .shx entries point at one record each, in order, none inside another: GDAL
    reads each shape where its entry points, so an index pointing every entry at the
    first shape would publish that shape once per record."""
    if not len(starts):
        return
    if starts[0] < _SHP_HEADER or (ends < starts + 8).any():
        raise BadInputError(
            str(shp), "its index (.shx) has an entry before the first record or of negative length"
        )
    overlapping = np.flatnonzero(starts[1:] < ends[:-1]) + 1
    if len(overlapping):
        first = int(overlapping[0])
        raise BadInputError(
            str(shp),
            f"its index (.shx) is not in the order of the .shp's records: {len(overlapping)} "
            f"entries point into or before the record of the entry before them (first: "
            f"record {first + 1}, at byte {int(starts[first])}); refused, as GDAL would read "
            "the same bytes as several records",
        )


def check_parquet(path: "Path | str") -> None:
    """Readable Parquet with GeoParquet metadata and unique column names."""
    try:
        schema = io.parquet_schema(path)
    except GeoisoError:
        raise
    except Exception as exc:
        raise BadInputError(str(path), f"is not readable Parquet: {exc}") from exc
    if b"geo" not in (schema.metadata or {}):
        raise BadInputError(
            str(path), "is Parquet without GeoParquet 'geo' metadata (no geometry column known)"
        )
    duplicates = sorted(name for name, n in Counter(schema.names).items() if n > 1)
    if duplicates:
        raise BadInputError(str(path), f"has duplicate column names: {duplicates}")
    _check_edges(path, schema.metadata[b"geo"])
    rows, size = io.open_parquet(path).metadata.num_rows, io.size(path)
    if rows > MAX_PARQUET_ROWS_PER_BYTE * max(size, 1):
        raise BadInputError(
            str(path),
            f"declares {rows:,} rows in {size:,} bytes (more than {MAX_PARQUET_ROWS_PER_BYTE} "
            "a byte: a Parquet bomb, as a zip's ratio limit refuses); refused",
        )


def _check_edges(path: "Path | str", raw: bytes) -> None:
    """Every step here is planar (GEOS): geodesic edges would be published as straight
    lines under a `geo` that no longer says so. GeoParquet's `edges` may be absent or
    "planar"; anything else is refused."""
    try:
        columns = json.loads(raw).get("columns") or {}
    except (ValueError, AttributeError):
        return  # io.geo_metadata names what is wrong with it
    for name, column in columns.items() if isinstance(columns, dict) else ():
        edges = column.get("edges", "planar") if isinstance(column, dict) else "planar"
        if edges != "planar":
            raise BadInputError(
                str(path),
                f"its geometry column {name!r} declares edges {str(edges)[:40]!r}; geoiso's "
                "steps are planar (GEOS) and would publish them as straight lines; refused "
                "(segmentize the edges at the source, or write them planar)",
            )


def shapes_with_geometry(shp: "Path | str") -> int:
    """How many records the .shx indexes with a shape (a null shape's record is 4 bytes)."""
    shx = io.shapefile_part(shp, ".shx")
    index = io.read_head(shx) if shx else b""
    return sum(length > 2 for _, length in struct.iter_unpack(">ii", index[_SHP_HEADER:]))


def check_geojson_crs(path: Path, names: list[str], crs: pyproj.CRS) -> None:
    """GDAL reads a GeoJSON 'crs' member it does not understand as WGS 84 (an unknown
    name): refuse that silent guess. `names` are what the members declare, judged on the
    parsed JSON before GDAL opened the file (spatial/declared.py, which refuses any other
    kind of member); each must be a CRS PROJ knows and the one GDAL read."""
    for name in dict.fromkeys(names):
        _check_named_crs(path, name, crs)


def _check_named_crs(path: Path, declared: str, crs: pyproj.CRS) -> None:
    try:
        known = pyproj.CRS.from_user_input(declared)
    except pyproj.exceptions.CRSError:
        raise BadInputError(
            str(path), f"declares CRS {declared!r}, which PROJ does not know"
        ) from None
    if not known.equals(crs, ignore_axis_order=True):
        raise BadInputError(str(path), f"declares CRS {declared!r} but was read as {crs.name}")


def nonfinite(geometries: np.ndarray) -> np.ndarray:
    """Mask of geometries with a NaN or infinite coordinate (X, Y, or Z where it has Z).

    Every coordinate is looked at: GEOS leaves a NaN out of a polygon's bounds, so bounds
    alone would pass POLYGON ((0 0, NaN 0, 1 1, 0 0)).
    """
    bad = np.zeros(len(geometries), dtype=bool)
    owners = np.repeat(np.arange(len(geometries)), shapely.get_num_coordinates(geometries))
    xy = shapely.get_coordinates(geometries)
    bad[owners[~np.isfinite(xy).all(axis=1)]] = True
    with_z = np.flatnonzero(shapely.has_z(geometries) & ~bad)
    if len(with_z):
        z = shapely.get_coordinates(geometries[with_z], include_z=True)[:, 2]
        z_owners = np.repeat(with_z, shapely.get_num_coordinates(geometries[with_z]))
        bad[z_owners[~np.isfinite(z)]] = True
    return bad
