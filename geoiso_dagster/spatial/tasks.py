"""The tasks the pool runs, by name: path in, GeoParquet path out, facts returned."""

import base64
import os
import time
from pathlib import Path

import geopandas
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import shapely

from geoiso_dagster import paths
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.fsutil import atomic_path, temp_path_for
from geoiso_dagster.pool.worker import progress
from geoiso_dagster.settings import check_aggregations, check_target_crs
from geoiso_dagster.spatial import faults, integrity, io, sources, stream, thumbnail, union
from geoiso_dagster.spatial.ingest import gdal_info, ingest_file
from geoiso_dagster.spatial.ingest import survey as ingest_survey
from geoiso_dagster.spatial.io import write_geoparquet
from geoiso_dagster.spatial.transfer import download_staged, fetch, upload  # noqa: F401 - tasks
from geoiso_dagster.spatial.union import polygonal_parts, repair, union_group

FEATURE_COUNT_COLUMN = "feature_count"
_POLYGONAL = {"Polygon", "MultiPolygon"}


def ingest(
    source: str, output: str, features: list[int] | None = None, layer: str | None = None
) -> dict:
    """raw_features: any vector file or GeoParquet -> GeoParquet, unchanged, streamed in
    batches (see spatial/ingest.py). With `features` = [skip, count] (GDAL sources) or
    [first row group, row groups] (GeoParquet), only that range: one part of a fan-out."""
    faults.at_start("ingest")
    started = time.perf_counter()
    last = [time.monotonic()]

    def report(rows: int, expected: int | None) -> None:
        if time.monotonic() - last[0] >= 1.0:
            of = f" of {expected}" if expected is not None else ""
            progress(
                f"read {rows}{of} features from {_name(source)}",
                done=rows,
                total=expected,
                unit="features",
            )
            last[0] = time.monotonic()

    try:
        with atomic_path(Path(output)) as tmp, faults.around_write(tmp):
            written = ingest_file(
                io.ref(source),
                tmp,
                features,
                on_batch=report,
                part=features is not None,
                layer=layer,
            )
    except OSError as exc:
        raise io.os_error(Path(output), exc, "writing") from exc
    progress(
        f"read and wrote {written['rows']} features from {_name(source)} "
        f"in {time.perf_counter() - started:.2f} s",
        features=written["rows"],
    )
    if features is not None:  # a part file: its facts go to `concatenate`
        return {
            "path": output,
            "rows": written["rows"],
            "geo": written["geo"],
            "runs": written["runs"],
        }
    return io.describe(Path(output))


def _name(source: str) -> str:
    return source.rpartition("/")[2]


def survey(source: str, layer: str | None = None) -> dict:
    """How many features a source holds and whether ranges of them can be read alone."""
    faults.at_start("survey")
    return ingest_survey(source, layer)


def concatenate(
    parts: list[str],
    output: str,
    runs: list[list[list[int]]],
    geos: list[dict] | None = None,
) -> dict:
    """Join the parts of a fan-out into `output` (atomically), their sorted runs (`runs`,
    see stream.TableSink) merged in Hilbert order; `geos`: the parts' `geo` metadata when
    their files do not carry it (ingest parts)."""
    faults.at_start("concatenate")
    try:
        with atomic_path(Path(output)) as tmp, faults.around_write(tmp):
            stream.concatenate([Path(p) for p in parts], tmp, runs, geos)
    except OSError as exc:
        raise io.os_error(Path(output), exc, "writing") from exc
    return io.describe(Path(output))


def drop_m(geometries: np.ndarray) -> tuple[np.ndarray, int]:
    """Remove M values, keeping Z. The transform does not carry M: GeoPandas' to_crs
    turns both Z and M of an XYZM geometry into NaN, and shapely.force_3d sets Z to 0."""
    measured = shapely.has_m(geometries)
    if not measured.any():
        return geometries, 0
    out = np.array(geometries, dtype=object, copy=True)
    has_z = shapely.has_z(geometries)
    for dimension, mask in ((3, measured & has_z), (2, measured & ~has_z)):
        if mask.any():
            out[mask] = shapely.from_wkb(shapely.to_wkb(out[mask], output_dimension=dimension))
    return out, int(measured.sum())


def _parse_crs(value: str, path: str) -> pyproj.CRS:
    """The target CRS, parsed here in a worker (under the pool's timeout) after the text
    passed the allow-list grammar; it must be horizontal: a vertical, geocentric or
    engineering CRS has no x and y to put features in."""
    check_target_crs(value, where=path)
    try:
        crs = io.parse_crs(value)
    except pyproj.exceptions.CRSError as exc:
        raise BadInputError(path, f"target_crs {value!r} is not a CRS PROJ knows: {exc}") from exc
    if not (crs.is_geographic or crs.is_projected) or crs.is_geocentric:
        raise BadInputError(
            path,
            f"target_crs {value[:80]!r} is a {crs.type_name}, not a horizontal (geographic "
            "or projected) CRS; features need one with x and y axes",
        )
    return crs


def reproject(
    source: str, output: str, target_crs: str, row_groups: list[int] | None = None
) -> dict:
    """reprojected_features: to `target_crs`, streamed row group by row group; a copy
    when the CRS already equals it (compared by pyproj, not as text). With `row_groups`,
    only those (one part of a fan-out over the workers; see `concatenate`)."""
    faults.at_start("reproject")
    target = _parse_crs(target_crs, source)
    source_crs = io.geoparquet_crs(io.ref(source))
    started = time.perf_counter()
    measured = 0
    if source_crs.equals(target) and row_groups is None:
        try:
            with atomic_path(Path(output)) as tmp, faults.around_write(tmp):
                io.copy_to(source, tmp)
        except OSError as exc:  # a full disk here is as transient as in the transform
            raise io.os_error(Path(output), exc, "writing") from exc
        progress(f"already in {io.crs_label(target)}; copied without a transform")
        facts = io.describe(Path(output))
        facts.update(transformed=False, dropped_m=0)
        return facts
    limits = _projected_area_of_use(target)

    def prepare(geometries: np.ndarray) -> np.ndarray:
        nonlocal measured
        geometries, dropped = drop_m(geometries)
        measured += dropped
        return geometries

    def check(bounds, nonfinite, present, first_row: int) -> None:
        _refuse_unrepresentable(bounds, nonfinite, present, first_row, source, target, limits)

    def report(done: int, total: int) -> None:
        progress(
            f"reprojected row group {done} of {total}",
            done=done,
            total=total,
            unit="row groups",
        )

    try:
        with atomic_path(Path(output)) as tmp, faults.around_write(tmp):
            written = stream.reproject_file(
                io.ref(source),
                tmp,
                source_crs,
                target,
                prepare,
                check,
                report,
                row_groups,
                part=row_groups is not None,
            )
    except OSError as exc:
        raise io.os_error(Path(output), exc, "writing") from exc
    progress(
        f"reprojected {written['rows']} features to {io.crs_label(target)} "
        f"in {time.perf_counter() - started:.2f} s"
        + (f" (dropped M values of {measured} measured geometries)" if measured else "")
    )
    if row_groups is not None:  # a part file: its facts go to `concatenate`
        return {
            "path": output,
            "rows": written["rows"],
            "runs": written["runs"],
            "transformed": True,
            "dropped_m": measured,
        }
    facts = io.describe(Path(output))
    facts.update(transformed=True, dropped_m=measured)
    return facts


# How far past the projected bounds of a CRS's area of use coordinates may lie before
# they are garbage rather than a little outside (a UTM zone's neighbour, say).
AREA_OF_USE_MARGIN = 0.5


def _projected_area_of_use(target: pyproj.CRS) -> tuple[float, float, float, float]:
    """Where coordinates in `target` are meaningful: its area of use, projected, with a
    margin; never beyond what the CRS can hold at all (io.coordinate_limits: latitude
    within +/-90 however wide the margin)."""
    hard = io.coordinate_limits(target)
    area = target.area_of_use
    if area is None:
        return hard
    to_target = pyproj.Transformer.from_crs("EPSG:4326", target, always_xy=True)
    minx, miny, maxx, maxy = to_target.transform_bounds(*area.bounds, densify_pts=21)
    if not np.isfinite([minx, miny, maxx, maxy]).all():
        return hard
    dx, dy = (maxx - minx) * AREA_OF_USE_MARGIN, (maxy - miny) * AREA_OF_USE_MARGIN
    soft = (minx - dx, miny - dy, maxx + dx, maxy + dy)
    return (*np.maximum(soft[:2], hard[:2]).tolist(), *np.minimum(soft[2:], hard[2:]).tolist())


def _refuse_unrepresentable(
    bounds: np.ndarray,
    nonfinite: np.ndarray,
    present: np.ndarray,
    first_row: int,
    source: str,
    target: pyproj.CRS,
    limits,
) -> None:
    """Refuse features the target CRS cannot hold: non-finite coordinates after the
    transform, or coordinates far outside where the CRS is defined (the poles in Web
    Mercator come out finite but meaningless, at y = 2.4e8 m). Takes the transformed
    features' bounds, non-finite mask and presence (neither null nor empty)."""
    bad = nonfinite.copy()
    where = "non-finite coordinates after the transform"
    outside = present & ~bad & io.outside_limits(bounds, limits)
    if outside.any():
        area = target.area_of_use.name.split(".")[0] if target.area_of_use else "its range"
        where = f"far outside where it is defined ({area})"
    bad |= outside
    if bad.any():
        rows = np.flatnonzero(bad) + first_row
        raise BadInputError(
            source,
            f"{len(rows)} feature(s) cannot be represented in {io.crs_label(target)}: "
            f"{where}, e.g. rows {rows[:5].tolist()}",
        )


def dissolve(
    source: str,
    output: str,
    dissolve_by: str,
    aggfunc: str = "first",
    aggregations: dict[str, str] | None = None,
    ranks: list[int] | None = None,
    row_groups: list[int] | None = None,
) -> dict:
    """dissolved_regions: repair, keep polygons, union per key, aggregate the rest.

    Rows whose key is null are dropped first (and counted). Geometries stay WKB in an
    Arrow table and are decoded one group at a time, so memory holds the part's Arrow
    data plus one group's shapes, never every shape at once. With `ranks` = [first, end],
    only the groups whose position among the sorted keys is in that range (one part of
    a dissolve planned by `plan_dissolve`; `join_dissolved` puts the parts together; the
    plan counts the null keys). A part may hold nothing: it then writes no file and says
    so.
    """
    faults.at_start("dissolve")
    _check_dissolve_columns(source, dissolve_by)
    read = _read_for_dissolve(source, dissolve_by, ranks, row_groups)
    if read is None:  # a part of a fan-out with no group of its own
        return {"path": None, "rows": 0, "dropped_null_keys": 0}
    table, geometry_name, crs = read
    columns = union.attribute_columns(table.column_names, dissolve_by, geometry_name)
    order = _source_order(table)
    if dissolve_by not in columns:
        raise BadInputError(
            source, f"dissolve_by column {dissolve_by!r} is not in the data; columns: {columns}"
        )
    aggregations = dict(aggregations or {})
    check_aggregations(aggfunc, aggregations, where=source)
    unknown = sorted(set(aggregations) - set(columns))
    if unknown:
        raise BadInputError(source, f"aggregations name columns not in the data: {unknown}")
    attributes = table.select(columns).to_pandas()
    keys = attributes[dissolve_by]
    if ranks is None and keys.isna().all():
        raise BadInputError(source, f"dissolve_by column {dissolve_by!r} is null in every row")
    null_keys = int(keys.isna().sum())
    if ranks is not None:  # a part holds no null key; the plan counts them
        null_keys = 0

    started = time.perf_counter()
    wkb = table.column(geometry_name).combine_chunks()
    del table
    groups = attributes.groupby(dissolve_by, sort=True).indices  # null keys left out
    kept = np.zeros(len(attributes), dtype=bool)
    unions: dict = {}
    repaired_count = coverage_groups = 0
    kinds: set[str] = set()
    last_report = time.monotonic()
    for n, (key, rows) in enumerate(groups.items(), start=1):
        geometries = shapely.from_wkb(wkb.take(rows).to_numpy(zero_copy_only=False))
        repaired, count = repair(geometries)
        repaired_count += count
        polygonal = polygonal_parts(repaired)
        ok = ~shapely.is_missing(polygonal) & ~shapely.is_empty(polygonal)
        kept[rows[ok]] = True
        if ok.any():
            unions[key], used_coverage = union_group(polygonal[ok])
            coverage_groups += used_coverage
        else:
            kinds |= {str(t) for t in shapely.get_type_id(geometries) if t >= 0}
        if time.monotonic() - last_report >= 1.0:
            progress(
                f"dissolved {n} of {len(groups)} groups",
                done=n,
                total=len(groups),
                unit="groups",
            )
            last_report = time.monotonic()
    with_key = int(keys.notna().sum())
    dropped_non_polygonal = with_key - int(kept.sum())
    if not unions:
        if ranks is not None:
            return {
                "path": None,
                "rows": 0,
                "dropped_null_keys": null_keys,
                "dropped_non_polygonal": dropped_non_polygonal,
            }
        names = sorted(io.GEOMETRY_TYPE_NAMES.get(int(k), k) for k in kinds)
        raise BadInputError(source, f"has no polygonal geometries to dissolve (types: {names})")

    in_order = attributes[kept]
    if order is not None:  # "first" and "last" in the source's order, not the file's
        in_order = in_order.iloc[np.argsort(order[kept], kind="stable")]
    grouped = in_order.groupby(dissolve_by, sort=True)
    agg = {c: aggregations.get(c, aggfunc) for c in columns if c != dissolve_by}
    try:
        result = grouped.agg(agg) if agg else pd.DataFrame(index=grouped.size().index)
    except Exception as exc:  # pandas raises many types for a column it cannot aggregate
        raise BadInputError(
            source,
            f"aggregation failed ({aggfunc=}, {aggregations=}): {type(exc).__name__}: {exc}; "
            "choose an aggregation that fits the column's type (per column: aggregations)",
        ) from None
    result[FEATURE_COUNT_COLUMN] = grouped.size()
    result = result.reset_index()
    result[geometry_name] = [unions[key] for key in result[dissolve_by]]
    result = geopandas.GeoDataFrame(result, geometry=geometry_name, crs=crs)
    progress(
        f"dissolved {int(kept.sum())} features into {len(result)} groups by {dissolve_by!r} "
        f"in {time.perf_counter() - started:.2f} s ({coverage_groups} by coverage union, "
        f"{len(result) - coverage_groups} by unary union; repaired {repaired_count} invalid "
        "geometries)",
        groups=len(result),
        repaired=repaired_count,
    )
    facts = _write_dissolved(result, output, source)
    if ranks is None:
        facts.update(_thumbnail(result))
    facts.update(
        repaired_geometries=repaired_count,
        dropped_null_keys=null_keys,
        dropped_non_polygonal=dropped_non_polygonal,
        dissolve_by=dissolve_by,
        coverage_union_groups=coverage_groups,
        unary_union_groups=len(result) - coverage_groups,
    )
    return facts


def _read_for_dissolve(
    source: str, dissolve_by: str, ranks: list[int] | None, row_groups: list[int] | None
):
    """(Arrow table without the bbox covering, geometry column name, CRS): the whole
    file; or, for ranks [first, end], only the rows of those keys in sorted order (the
    key column is read first, then only the part's rows); or None when the range holds
    no key. `row_groups`: only those are read (the plan's: where the range's keys are)."""
    if ranks is None:
        return io.read_geoparquet_table(source)
    _require_key_column(source, dissolve_by)
    uniques = union.sorted_keys(source, dissolve_by)
    if len(uniques) == 0:
        raise BadInputError(source, f"dissolve_by column {dissolve_by!r} is null in every row")
    mine = list(uniques[ranks[0] : ranks[1]])
    if not mine:
        return None
    return io.read_geoparquet_table(source, where=(dissolve_by, mine), row_groups=row_groups)


def _require_key_column(source: str, dissolve_by: str) -> None:
    names = [n for n in io.read_schema(io.ref(source)).names if n != "bbox"]
    if dissolve_by not in names:
        raise BadInputError(
            source, f"dissolve_by column {dissolve_by!r} is not in the data; columns: {names}"
        )


def _source_order(table: pa.Table) -> np.ndarray | None:
    """Each row's position in the source (see io.SOURCE_ROW), when the file has it."""
    if io.SOURCE_ROW not in table.column_names:
        return None
    return table.column(io.SOURCE_ROW).to_numpy()


def _thumbnail(result) -> dict:
    """{"thumbnail_png": base64 PNG}, or {} when the map cannot be drawn: the map is a
    picture in the catalog, never a reason to fail a dissolve that is otherwise good."""
    try:
        return {
            "thumbnail_png": base64.b64encode(thumbnail.render(result.geometry.values)).decode()
        }
    except Exception as exc:  # noqa: BLE001 - see docstring
        progress(f"no map drawn for this output: {type(exc).__name__}: {exc}")
        return {}


def _write_dissolved(result, output: str, source: str) -> dict:
    """write_geoparquet, with values an aggregation made that Parquet cannot hold (mixed
    types, say) named as the input's problem."""
    try:
        return write_geoparquet(result, output)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise BadInputError(
            source, f"the aggregated columns cannot be written: {type(exc).__name__}: {exc}"
        ) from None


# Arrow types a dissolve key may have: values that name a region. Lists, structs, maps and
# binary blobs do not (pandas cannot even group by them).
def _is_key_type(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if hasattr(kind, "storage_type"):  # an extension type (GDAL JSON text): judge its storage
        kind = kind.storage_type
    return (
        pa.types.is_null(kind)  # every key null: refused as such, further on
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_temporal(kind)
    )


def _check_dissolve_columns(source: str, dissolve_by: str) -> None:
    """The key names a column of a type that can name regions, and the data has no column
    of the name the dissolve writes its count into (it would be overwritten)."""
    schema = io.read_schema(io.ref(source))
    if dissolve_by == FEATURE_COUNT_COLUMN or FEATURE_COUNT_COLUMN in schema.names:
        raise BadInputError(
            source,
            f"has a column {FEATURE_COUNT_COLUMN!r}, the name the dissolve gives its count of "
            "features per region; rename that column at the source (its values would be "
            "overwritten)",
        )
    if dissolve_by in schema.names and not _is_key_type(schema.field(dissolve_by).type):
        raise BadInputError(
            source,
            f"dissolve_by column {dissolve_by!r} holds {schema.field(dissolve_by).type} values; "
            "a dissolve key must be text, a number, a boolean or a date",
        )


def join_dissolved(parts: list[str | None], output: str, dissolve_by: str, source: str) -> dict:
    """Put the parts of a fanned-out dissolve together as one file: ordered by key, then
    written, as every output is, in Hilbert order (the key order settles ties, so the
    file is the one-task dissolve's)."""
    faults.at_start("join_dissolved")
    frames = [geopandas.read_parquet(p) for p in parts if p]
    if not frames:
        raise BadInputError(source, "has no polygonal geometries to dissolve")
    result = pd.concat(frames, ignore_index=True).sort_values(dissolve_by, kind="stable")
    result = geopandas.GeoDataFrame(result.reset_index(drop=True), crs=frames[0].crs)
    facts = _write_dissolved(result, output, source)
    facts.update(_thumbnail(result))
    return facts


def plan_dissolve(source: str, dissolve_by: str, memory_limit_mb: int, min_parts: int) -> dict:
    """How a dissolve fits workers of `memory_limit_mb` (see spatial/union.py)."""
    faults.at_start("plan_dissolve")
    _check_dissolve_columns(source, dissolve_by)
    _require_key_column(source, dissolve_by)
    return union.plan(source, dissolve_by, memory_limit_mb, min_parts)


def dissolve_chunk(source: str, output: str, dissolve_by: str, **options) -> dict:
    """One chunk of a group too large for one worker (see spatial/union.py)."""
    faults.at_start("dissolve_chunk")
    check_aggregations(options.get("aggfunc", "first"), options.get("aggregations") or {}, source)
    return union.dissolve_chunk(source, output, dissolve_by, **options)


def union_partials(partials: list[str], output: str, **options) -> dict:
    """Partial unions of a group too large for one worker, unioned (spatial/union.py)."""
    faults.at_start("union_partials")
    return union.union_partials(partials, output, **options)


def inspect(
    path: str,
    expected_crs: str | None = None,
    expected_crs_of: str | None = None,
    unique_key: str | None = None,
    geometries: str = "sample",
    source: str | None = None,
    layer: str | None = None,
) -> dict:
    """Independent facts about a file just written, for the asset checks: read back from
    disk, trusting nothing the writer said.

    `geometries`: "all" decodes and validates every geometry (the dissolved output, one
    row per region); "sample" decodes the first row group only, so that checking a
    million-row input does not cost as much as producing it. Every output's bbox (from
    the covering column's statistics) is compared with what its CRS can hold; with
    `source` (raw_features), the source's own declared counts are read again.
    """
    target = Path(path)
    facts: dict = {"path": path, "readable": False}
    try:
        geo = io.geo_metadata(target)
        parquet = pq.ParquetFile(target)
        crs = io.geoparquet_crs(target)
        primary = geo["primary_column"]
        if geometries == "all":
            table = parquet.read(columns=[primary])
        elif parquet.metadata.num_row_groups:
            table = parquet.read_row_group(0, columns=[primary])
        else:
            table = None
        decoded = (
            shapely.from_wkb(table[primary].to_numpy(zero_copy_only=False))
            if table is not None
            else np.array([], dtype=object)
        )
    except BadInputError as exc:
        facts["error"] = exc.cause
        return facts
    except Exception as exc:  # a corrupt footer, page or WKB: not readable, and why
        facts["error"] = f"{type(exc).__name__}: {exc}"
        return facts
    covering = geo["columns"][primary].get("covering", {})
    missing = shapely.is_missing(decoded)
    facts.update(
        readable=True,
        geo_version=geo.get("version"),
        bbox_covering="bbox" in covering,
        rows=int(parquet.metadata.num_rows),
        crs=io.crs_label(crs),
        geometries_checked=geometries,
        missing_geometries=int(missing.sum()),
        empty_geometries=int(shapely.is_empty(decoded).sum()),
        invalid_geometries=int((~shapely.is_valid(decoded) & ~missing).sum()),
    )
    expected = None
    if expected_crs_of is not None:
        expected = io.geoparquet_crs(io.ref(expected_crs_of))
    elif expected_crs is not None:
        expected = _parse_crs(expected_crs, path)
    if expected is not None:
        facts["expected_crs"] = io.crs_label(expected)
        facts["crs_matches"] = bool(crs.equals(expected))
    bbox, boxless = io.covering_statistics(parquet, geo)
    limits = io.coordinate_limits(crs)
    facts["bbox_seen"] = bbox
    facts["crs_limits"] = list(limits)
    facts["present_geometries"] = None if boxless is None else facts["rows"] - boxless
    if bbox is None:  # no statistics (not ours), or no geometry to be out of range
        facts["in_crs_range"] = facts["present_geometries"] == 0
    else:
        facts["in_crs_range"] = not io.outside_limits(np.array([bbox], dtype=float), limits)[0]
    facts["in_crs_range"] = bool(facts["in_crs_range"])
    if source is not None:
        facts.update(_declared_counts(io.ref(source), target, layer))
    if unique_key is not None:
        if unique_key in parquet.schema_arrow.names:
            keys = parquet.read(columns=[unique_key]).column(0).to_pandas()
            facts["duplicate_keys"] = int(keys.duplicated().sum())
        else:
            facts["duplicate_keys"] = None
    return facts


def inspect_object(relative: str, **kwargs) -> dict:
    """inspect() of a staged object of an S3 root, read back from the bucket: the bytes
    checked are the bytes that will be published, not the local file they came from."""
    copy = temp_path_for(paths.data_root() / relative)
    try:
        info = download_staged(relative, copy)
        facts = inspect(str(copy), **kwargs)
    finally:
        copy.unlink(missing_ok=True)
    facts["path"] = f"s3://{paths.remote_root().bucket}/{info.key}"
    facts["etag"] = info.etag
    return facts


def _declared_counts(source: "Path | str", scratch_beside: Path, layer: str | None) -> dict:
    """What the source itself declares, read again here and not taken from the step: its
    feature count (-1 unknown), and for a shapefile the records its index gives a shape."""
    facts: dict = {"source_features": None, "source_geometries": None}
    try:
        with sources.opened(source, scratch_beside) as (path, _):
            suffix = sources.suffix_of(path)
            if suffix in io.PARQUET_SUFFIXES:
                facts["source_features"] = int(io.open_parquet(path).metadata.num_rows)
            else:
                info = gdal_info(path, str(source), layer)
                facts["source_features"] = int(info["features"])
                if suffix == ".shp":
                    facts["source_geometries"] = integrity.shapes_with_geometry(path)
    except BadInputError as exc:
        facts["source_error"] = exc.cause
    return facts


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
