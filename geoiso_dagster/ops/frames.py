"""Reading and writing frames in a worker function: what a step of your own needs to
read its GeoParquet inputs (local files or objects of an S3 root) and to write its
output the way every file here is written. Worker layer: imports geopandas."""

import contextlib
from collections.abc import Iterator

import geopandas
import pyarrow as pa
import shapely

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.records import OutputFacts
from geoiso_dagster.spatial import io

__all__ = ["bounds_of", "geometry_errors", "read", "read_near", "same_crs", "write"]


def read(source: str, row_groups: list[int] | None = None) -> geopandas.GeoDataFrame:
    """A GeoParquet input (an upstream output) as a GeoDataFrame, without its bbox
    covering column; with `row_groups`, only those row groups (one part of a fan-out).
    BadInputError naming the file when it is missing or not GeoParquet."""
    table, primary, crs = io.read_geoparquet_table(source, row_groups=row_groups)
    frame = table.drop_columns([primary]).to_pandas()
    wkb = table[primary].to_numpy(zero_copy_only=False)
    frame[primary] = geopandas.GeoSeries(shapely.from_wkb(wkb), crs=crs, index=frame.index)
    return geopandas.GeoDataFrame(frame, geometry=primary, crs=crs)


def read_near(path: str, bbox: tuple[float, float, float, float] | None) -> geopandas.GeoDataFrame:
    """The features of a GeoParquet layer whose bbox (its covering column) meets `bbox`:
    row groups whose statistics lie apart are never read. None: the whole layer."""
    if not io.exists(path):
        raise BadInputError(str(path), "input layer does not exist")
    with io.reading(path):
        geo = io.geo_metadata(io.ref(path))
        schema = io.open_parquet(io.ref(path)).schema_arrow
    covering = io.covering_column(geo)
    columns = [name for name in schema.names if name != covering]
    where, filesystem = io.arrow_location(path)
    try:
        frame = geopandas.read_parquet(
            where,
            columns=columns,
            bbox=None if bbox is None or covering is None else tuple(bbox),
            filesystem=filesystem,
        )
    except (pa.ArrowException, ValueError) as exc:
        raise BadInputError(str(path), f"is not readable GeoParquet: {exc}") from None
    if bbox is not None and covering is None:  # no covering: filter the geometries here
        frame = frame[frame.intersects(shapely.box(*bbox))]
    if frame.crs is None:
        raise BadInputError(str(path), "has no CRS")
    return frame


def bounds_of(
    frame: geopandas.GeoDataFrame, grow: float = 0.0
) -> tuple[float, float, float, float] | None:
    """The bbox of a frame's geometries, grown by `grow` on each side; None when empty."""
    if frame.empty or frame.geometry.isna().all():
        return None
    minx, miny, maxx, maxy = frame.total_bounds
    return (minx - grow, miny - grow, maxx + grow, maxy + grow)


def same_crs(left: geopandas.GeoDataFrame, right: geopandas.GeoDataFrame, path: str) -> None:
    """BadInputError naming `path` (the right input) when its CRS is not the left's."""
    if left.crs is not None and right.crs is not None and not left.crs.equals(right.crs):
        raise BadInputError(
            str(path),
            f"is in {io.crs_label(right.crs)} and the source in {io.crs_label(left.crs)}: "
            "bring both to one CRS first (reprojected_features' target_crs)",
        )


def write(frame: geopandas.GeoDataFrame, output: str) -> OutputFacts:
    """Write `frame` as every output here is written (GeoParquet 1.1, bbox covering,
    zstd, Hilbert order, bounded row groups) atomically; its facts (rows, ...)."""
    frame = frame.reset_index(drop=True)
    return io.write_geoparquet(frame, output)


@contextlib.contextmanager
def geometry_errors(*layers: str) -> Iterator[None]:
    """GEOS refusing the inputs' geometries (a TopologyException on an invalid polygon)
    becomes bad input naming the layers, with the remedy, not a bare GEOS error."""
    try:
        yield
    except shapely.errors.GEOSException as exc:
        raise BadInputError(
            " and ".join(layers),
            f"holds geometries GEOS cannot work with ({str(exc).split(':')[0]}: "
            f"{str(exc).partition(':')[2].strip()[:160]}); make them valid first "
            "(shapely.make_valid) or repair the source",
        ) from None
