"""Reading inputs and writing GeoParquet, with every failure named by file and cause."""

import contextlib
import errno
import functools
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import geopandas
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pyogrio
import pyproj
import shapely

from geoiso_dagster import formats, fsutil, objectstore
from geoiso_dagster.errors import BadInputError, StorageAccessError, TransientIOError
from geoiso_dagster.formats import PARQUET_SUFFIXES  # noqa: F401 - one definition
from geoiso_dagster.fsutil import atomic_path
from geoiso_dagster.records import OutputFacts
from geoiso_dagster.settings import check_crs
from geoiso_dagster.spatial import faults, hilbert, remote

# Tens of thousands of rows per row group: small enough that a bbox filter skips most
# of a file, large enough that per-group overhead stays negligible.
ROW_GROUP_ROWS = 50_000
# Each feature's position in its source file (0-based), written beside the attributes of
# raw_features and kept downstream: rows are stored in Hilbert order, and this is how
# they go back to the source's order (a dissolve's "first" and "last" mean that order).
SOURCE_ROW = "geoiso_source_row"
# Rows decoded at a time while streaming: a row group is built from slices, so that only
# a fifth of a group's shapes is ever alive (the WKB of the rest waits in Arrow).
SLICE_ROWS = 10_000
# shapely.get_type_id -> the names GeoParquet's geometry_types use
GEOMETRY_TYPE_NAMES = {
    0: "Point",
    1: "LineString",
    2: "LinearRing",
    3: "Polygon",
    4: "MultiPoint",
    5: "MultiLineString",
    6: "MultiPolygon",
    7: "GeometryCollection",
}
# Chunks a source's bytes are scanned in.
_CHUNK = 2**20


def _errno(exc: OSError) -> int | None:
    """pyarrow raises OSError without errno set; its message carries '[errno N]'."""
    if exc.errno is not None:
        return exc.errno
    match = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
    return int(match.group(1)) if match else None


def is_uri(source) -> bool:
    """True for an object of an S3 data root (s3://bucket/key), read in place."""
    return isinstance(source, str) and source.startswith("s3://")


def ref(source: "str | Path") -> "str | Path":
    """A GeoParquet input as the readers here take it: an s3:// URI as it is, else a Path."""
    return source if is_uri(source) else Path(source)


def open_parquet(source: "str | Path", **kwargs) -> pq.ParquetFile:
    """pq.ParquetFile of a local file, or of an object read in place by range requests.
    An object is always pre-buffered: Arrow then fetches a row group's column chunks in a
    few coalesced requests instead of one request per chunk (measured against the test
    server: 4 row groups of the 1M file in 0.65 s instead of 4.22 s), for the memory
    the row group takes anyway."""
    if is_uri(source):
        version = remote.version(source)
        if version is not None and (source, version) in _FOOTERS:
            kwargs["metadata"] = _FOOTERS[source, version]
        parquet = objectstore.parquet_file(
            remote.s3_root(), source, **{**kwargs, "pre_buffer": True}
        )
        if version is not None:
            if len(_FOOTERS) >= 8:
                _FOOTERS.clear()
            _FOOTERS[source, version] = parquet.metadata
        return parquet
    return pq.ParquetFile(source, **kwargs)


# Footers of the source objects being read (by URI and ETag, see remote.gdal_access): a
# step opens its source several times (checks, schema, rows), each a request otherwise.
_FOOTERS: dict[tuple[str, str], pq.FileMetaData] = {}


def read_geoparquet_frame(source: "str | Path") -> geopandas.GeoDataFrame:
    """A whole GeoParquet file, local or an object of the root, as a GeoDataFrame."""
    where, filesystem = arrow_location(source)
    return geopandas.read_parquet(where, filesystem=filesystem)


def copy_to(source: "str | Path", target: Path) -> None:
    """Copy a GeoParquet input, local or an object of the root, to local `target`."""
    if not is_uri(source):
        shutil.copyfile(source, target)
        return
    where = objectstore.in_root(remote.s3_root(), source)
    try:
        with objectstore.arrow_filesystem().open_input_stream(where) as stream:
            with open(target, "wb") as out:
                while chunk := stream.read(8 * 2**20):
                    out.write(chunk)
    except OSError as exc:
        if "AWS Error" in str(exc) or isinstance(exc, FileNotFoundError):
            raise objectstore.arrow_error(exc, source, "copying it") from None
        raise


def exists(source: "str | Path") -> bool:
    return True if is_uri(source) else Path(source).exists()  # an object: opening says


def arrow_location(source: "str | Path") -> tuple[str, "object | None"]:
    """(where, filesystem) for Arrow and geopandas readers: a local path and None, or
    an object's 'bucket/key' and the S3 filesystem."""
    if is_uri(source):
        return objectstore.in_root(remote.s3_root(), source), objectstore.arrow_filesystem()
    return str(source), None


def parquet_schema(source: "str | Path") -> pa.Schema:
    """The Arrow schema (with its `geo` metadata) of a Parquet file or object."""
    return open_parquet(source).schema_arrow if is_uri(source) else pq.read_schema(source)


def shapefile_part(shp: "Path | str", suffix: str) -> "Path | str | None":
    """A part of a shapefile as GDAL finds it: the .shp's exact stem, the suffix as
    written or in upper case (never another file whose name differs only in case)."""
    if is_uri(shp):
        return remote.part_uri(shp, suffix)
    for name in formats.part_names(shp.stem, suffix):
        if (shp.parent / name).exists():
            return shp.parent / name
    return None


def size(file: "Path | str") -> int:
    """The bytes of a source file or object (as checked, for an object being read)."""
    return remote.size(file) if is_uri(file) else Path(file).stat().st_size


def read_head(file: "Path | str", length: int | None = None) -> bytes:
    """The first `length` bytes of a file or object (all of it by default)."""
    if is_uri(file):
        return remote.read_bytes(file, 0, length)
    with open(file, "rb") as handle:
        return handle.read() if length is None else handle.read(length)


def chunks(path: "Path | str") -> Iterator[bytes]:
    """The bytes of a file or object in chunks of about 1 MiB, then b''."""
    if is_uri(path):
        yield from remote.read(path)
    else:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk
    yield b""


def os_error(path: Path, exc: OSError, doing: str) -> Exception:
    if "AWS Error" in str(exc):  # Arrow's S3 filesystem, mid-read
        return objectstore.arrow_error(exc, str(path), doing)
    code = _errno(exc)
    reason = exc.strerror or " ".join(str(exc).split())
    if code == errno.ENOMEM or os.strerror(errno.ENOMEM) in str(exc):
        # The worker ran out of memory or address space (its RLIMIT_AS backstop): not the
        # file's fault. A MemoryError reaches the pool as a memory stop naming the limit.
        return MemoryError(f"{path}: {doing} failed: {reason}")
    if code in fsutil.TRANSIENT_ERRNOS:
        return TransientIOError(f"{path}: {doing} failed: {reason} (errno {code})")
    if doing.startswith("writing") or code in fsutil.REFUSING_ERRNOS:
        return fsutil.storage_error(Path(path), exc, doing)
    return BadInputError(str(path), f"{doing} failed: {reason}")


def gdal_name(source: "str | Path") -> "str | Path":
    """What GDAL opens for a source: a local path, or an object's /vsis3/ name."""
    return remote.gdal_name(source) if is_uri(source) else source


def check_readable(path: "str | Path") -> None:
    """The file (or object) exists and is not empty."""
    if is_uri(path):
        if remote.size(path) == 0:
            raise BadInputError(path, "file is empty (0 bytes)")
        return
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadInputError(str(path), "file does not exist") from None
    except OSError as exc:
        raise os_error(path, exc, "stat") from exc
    if size == 0:
        raise BadInputError(str(path), "file is empty (0 bytes)")


@contextlib.contextmanager
def reading(path: "Path | str") -> Iterator[None]:
    """Name the file and the cause of whatever reading it raises: GDAL, pyogrio, pyarrow
    and shapely each have their own exception types. For an object read through GDAL,
    GDAL's warnings meanwhile are kept: they hold the HTTP status of a failed request."""
    kept = warnings.catch_warnings(record=True) if is_uri(path) else contextlib.nullcontext([])
    with kept as seen:
        if is_uri(path):
            warnings.simplefilter("always")
        try:
            yield
        except (BadInputError, TransientIOError, StorageAccessError):
            raise
        except OSError as exc:
            raise os_error(path, exc, "reading") from exc
        except NotImplementedError as exc:  # shapely: curves
            raise BadInputError(str(path), curves_cause(exc)) from exc
        except Exception as exc:
            if is_uri(path):  # GDAL reading an object: by kind, never the server's text
                notes = [str(w.message) for w in seen]
                known = remote.gdal_error(path, exc, "reading it", notes)
                if known is not None:
                    raise known from None
                text = remote.scrub(_one_line(exc), path)
                raise BadInputError(path, f"cannot be read as vector data: {text}") from None
            raise BadInputError(
                str(path), f"cannot be read as vector data: {_one_line(exc)}"
            ) from exc


def curves_cause(exc: BaseException) -> str:
    return (
        f"has geometry types this pipeline cannot represent ({_one_line(exc)}); convert "
        "curves to linear geometries first (ogr2ogr -nlt CONVERT_TO_LINEAR)"
    )


def read_geoparquet_table(
    path: str | Path,
    where: tuple[str, list] | None = None,
    row_groups: list[int] | None = None,
) -> tuple[pa.Table, str, pyproj.CRS]:
    """(table, geometry column, CRS) of a GeoParquet file written by an upstream asset,
    geometries left as WKB and without the bbox covering column. `where` = (column,
    values): only the rows whose column holds one of the values, filtered row group by
    row group, so that no more than one group beyond the result is ever decoded;
    `row_groups`: only those row groups."""
    path = ref(path)
    if not exists(path):
        raise BadInputError(str(path), "upstream output does not exist; materialize it first")
    geo = geo_metadata(path)
    crs = geoparquet_crs(path, geo)
    primary = geo["primary_column"]
    covering = covering_column(geo)
    try:
        parquet = open_parquet(path, pre_buffer=False)
        columns = [n for n in parquet.schema_arrow.names if n != covering]
        pieces = []
        for group in range(parquet.num_row_groups) if row_groups is None else row_groups:
            piece = parquet.read_row_group(group, columns=columns)
            if where is not None:
                column, values = where
                piece = piece.filter(pa.compute.is_in(piece[column], value_set=pa.array(values)))
            pieces.append(piece)
        table = pa.concat_tables(pieces) if pieces else parquet.schema_arrow.empty_table()
    except OSError as exc:
        raise os_error(path, exc, "reading") from exc
    except Exception as exc:
        raise BadInputError(str(path), f"is not readable GeoParquet: {_one_line(exc)}") from exc
    if primary not in table.column_names:
        raise BadInputError(str(path), "has no geometry column")
    if table.num_rows == 0 and where is None:
        raise BadInputError(str(path), "has no features (0 rows)")
    return table, primary, crs


def write_geoparquet(frame: geopandas.GeoDataFrame, target: str | Path) -> OutputFacts:
    """Write GeoParquet 1.1 (zstd, bbox covering, bounded row groups) atomically and
    return the facts of the file as written."""
    target = Path(target)
    frame = _in_hilbert_order(frame)
    try:
        with atomic_path(target) as tmp, faults.around_write(tmp):
            frame.to_parquet(
                tmp,
                index=False,
                compression="zstd",
                schema_version="1.1.0",
                write_covering_bbox=True,
                row_group_size=ROW_GROUP_ROWS,
            )
    except OSError as exc:
        raise os_error(target, exc, "writing") from exc
    return describe(target)


BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")


def bbox_column(bounds: np.ndarray) -> pa.StructArray:
    """The bbox covering column; null for a missing or empty geometry (it has no box)."""
    return pa.StructArray.from_arrays(
        [pa.array(bounds[:, i], type=pa.float64()) for i in range(4)],
        names=list(BBOX_FIELDS),
        mask=pa.array(np.isnan(bounds).all(axis=1)),
    )


def _in_hilbert_order(frame: geopandas.GeoDataFrame) -> geopandas.GeoDataFrame:
    """The rows along the Hilbert curve over what the CRS can hold (spatial/hilbert.py),
    as every GeoParquet file here is written."""
    bounds = shapely.bounds(frame.geometry.values)
    domain = coordinate_limits(frame.crs) if frame.crs is not None else _own_extent(bounds)
    order = np.argsort(hilbert.keys(bbox_column(bounds), domain), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


def _own_extent(bounds: "np.ndarray") -> tuple[float, float, float, float]:
    if np.isnan(bounds).all():
        return (0.0, 0.0, 1.0, 1.0)
    return (*np.nanmin(bounds[:, :2], axis=0), *np.nanmax(bounds[:, 2:], axis=0))


def geoparquet_crs(path: Path, geo: dict | None = None) -> pyproj.CRS:
    """The CRS a GeoParquet file declares (its `geo` metadata, read here unless given),
    refused when it has none."""
    if not exists(path):
        raise BadInputError(str(path), "upstream output does not exist; materialize it first")
    if geo is None:
        geo = geo_metadata(path)
    column = geo["columns"][geo["primary_column"]]
    if "crs" in column and column["crs"] is None:
        raise BadInputError(str(path), "has an undefined CRS (crs: null)")
    crs = column.get("crs", "OGC:CRS84")  # GeoParquet: absent means OGC:CRS84
    text = crs if isinstance(crs, str) else json.dumps(crs, sort_keys=True)
    # Before PROJ reads it: the target_crs rules (no init file, no grid by path).
    check_crs(text, str(path), "the CRS its geo metadata declares")
    try:
        parsed = parse_crs(text)
    except pyproj.exceptions.CRSError as exc:
        raise BadInputError(str(path), f"declares a CRS PROJ does not know: {exc}") from exc
    return check_horizontal(parsed, str(path), "its declared CRS")


def check_horizontal(crs: pyproj.CRS, what: str, label: str) -> pyproj.CRS:
    """`crs` (`label`: how the message names it) is horizontal: geographic or projected
    (a compound CRS with one of those, a bound one over one). A vertical, geocentric or
    engineering (LOCAL_CS) CRS has no x and y that features can be put in: 2D polygons
    in geocentric EPSG:4978 were published, and their areas meant nothing."""
    if not (crs.is_geographic or crs.is_projected) or crs.is_geocentric:
        article = "an" if crs.type_name[:1] in "AEIOU" else "a"
        raise BadInputError(
            what,
            f"{label} is {article} {crs.type_name} ({crs.name[:60]}), not a horizontal (geographic "
            "or projected) CRS; features need one with x and y axes",
        )
    return crs


@functools.lru_cache(maxsize=64)
def parse_crs(text: str) -> pyproj.CRS:
    """pyproj.CRS of `text`, remembered by its exact text: a step reads the same CRS from
    every file it touches, and PROJ takes about 6 ms to build one from PROJJSON (43 % of
    a small file's worker time, measured). The same text always gives the same CRS, so
    the memory cannot carry anything from one file to another's result."""
    return pyproj.CRS.from_user_input(text)


def describe(path: Path) -> OutputFacts:
    """The facts the catalog shows about an output file, read from the file itself."""
    parquet = pq.ParquetFile(path)
    geo = json.loads(parquet.schema_arrow.metadata[b"geo"])
    column = geo["columns"][geo["primary_column"]]
    crs = geoparquet_crs(path)
    return {
        "path": str(path),
        "rows": int(parquet.metadata.num_rows),
        "row_groups": int(parquet.metadata.num_row_groups),
        "bytes": path.stat().st_size,
        "crs": crs_label(crs),
        "crs_name": crs.name,
        "bbox": _bbox(parquet, geo),
        "geometry_types": sorted(column.get("geometry_types", [])),
        "columns": [{"name": f.name, "type": str(f.type)} for f in parquet.schema_arrow],
        "versions": versions(),
    }


def _bbox(parquet: pq.ParquetFile, geo: dict) -> list[float]:
    """The file's bbox: from its `geo` metadata, else from the bbox covering column's
    row-group statistics, else from its values one row group at a time (reading the whole
    column at once took 640 MB at 10M rows, more than a worker may hold)."""
    column = geo["columns"][geo["primary_column"]]
    if column.get("bbox"):
        return [float(v) for v in column["bbox"]]
    covering = covering_column(geo)
    if covering is None:
        return []
    bbox, _ = covering_statistics(parquet, geo)
    if bbox is not None:
        return [float(v) for v in bbox]
    lows, highs = [math.inf, math.inf], [-math.inf, -math.inf]
    for group in range(parquet.num_row_groups):
        boxes = parquet.read_row_group(group, columns=[covering]).column(0).combine_chunks()
        low = [pa.compute.min(boxes.field(name)).as_py() for name in ("xmin", "ymin")]
        high = [pa.compute.max(boxes.field(name)).as_py() for name in ("xmax", "ymax")]
        if None not in low + high:
            lows = [min(a, b) for a, b in zip(lows, low, strict=True)]
            highs = [max(a, b) for a, b in zip(highs, high, strict=True)]
    return [*map(float, lows), *map(float, highs)] if math.isfinite(lows[0]) else []


# Beyond this distance from a projected CRS's origin a coordinate is no place on Earth
# (2.5 times the equator): 1e8 m, in the CRS's own unit.
PROJECTED_LIMIT_M = 1e8


def coordinate_limits(crs: pyproj.CRS) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) that coordinates in `crs` can take at all: longitude
    within +/-360 degrees (data east of the antimeridian may run past 180) and latitude
    within +/-90 for a geographic CRS, in its angular unit; otherwise within 1e8 m of the
    origin, in its linear unit. Used by ingest (refuse), reproject and the asset check."""
    axis = crs.axis_info[0] if crs.axis_info else None
    factor = axis.unit_conversion_factor if axis and axis.unit_conversion_factor else 1.0
    if crs.is_geographic:
        lon, lat = 2 * math.pi / factor, (math.pi / 2) / factor
        lat *= 1 + 1e-9  # rounding at the poles
        return -lon, -lat, lon, lat
    limit = PROJECTED_LIMIT_M / factor
    return -limit, -limit, limit, limit


def outside_limits(bounds, limits) -> "np.ndarray":
    """Rows of `bounds` (n x 4: minx, miny, maxx, maxy; NaN for no geometry) that reach
    outside `limits`."""
    minx, miny, maxx, maxy = limits
    with np.errstate(invalid="ignore"):
        return (
            (bounds[:, 0] < minx)
            | (bounds[:, 1] < miny)
            | (bounds[:, 2] > maxx)
            | (bounds[:, 3] > maxy)
        )


def covering_statistics(
    parquet: pq.ParquetFile, geo: dict
) -> tuple[list[float] | None, int | None]:
    """(the file's bbox, rows without a box: missing or empty geometries), from the row
    group statistics of the bbox covering column alone: no data page is read. (None,
    None) where the file has no covering or no statistics."""
    covering = covering_column(geo)
    if covering is None:
        return None, None
    metadata = parquet.metadata
    index = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    wanted = [index.get(f"{covering}.{name}") for name in ("xmin", "ymin", "xmax", "ymax")]
    if None in wanted:
        return None, None
    lows, highs, boxless = [math.inf, math.inf], [-math.inf, -math.inf], 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        stats = [row_group.column(i).statistics for i in wanted]
        if any(s is None or not s.has_null_count for s in stats):
            return None, None
        boxless += stats[0].null_count
        if stats[0].null_count == row_group.num_rows:
            continue
        if not all(s.has_min_max for s in stats):
            return None, None
        lows = [min(lows[0], stats[0].min), min(lows[1], stats[1].min)]
        highs = [max(highs[0], stats[2].max), max(highs[1], stats[3].max)]
    if not math.isfinite(lows[0]):
        return None, boxless
    return [*lows, *highs], boxless


def crs_label(crs: pyproj.CRS) -> str:
    """EPSG:xxxx when the CRS has an authority code, else its name."""
    authority = crs.to_authority()
    return f"{authority[0]}:{authority[1]}" if authority else crs.name


def versions() -> dict[str, str]:
    return {
        "gdal": pyogrio.__gdal_version_string__,
        "geos": shapely.geos_version_string,
        "proj": pyproj.proj_version_str,
    }


def covering_column(geo: dict) -> str | None:
    """The name of the bbox covering column that `geo` metadata declares, if any."""
    column = geo["columns"][geo["primary_column"]]
    return column.get("covering", {}).get("bbox", {}).get("xmin", [None])[0]


def read_schema(path: Path) -> pa.Schema:
    """The Arrow schema of an upstream GeoParquet output, named by file when unreadable."""
    if not exists(path):
        raise BadInputError(str(path), "upstream output does not exist; materialize it first")
    with reading(path):
        return parquet_schema(path)


def geo_metadata(path: Path) -> dict:
    """The `geo` key of a GeoParquet file's metadata."""
    schema = parquet_schema(path)
    raw = schema.metadata or {}
    if b"geo" not in raw:
        raise BadInputError(str(path), "is Parquet without GeoParquet 'geo' metadata")
    return json.loads(raw[b"geo"])


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
