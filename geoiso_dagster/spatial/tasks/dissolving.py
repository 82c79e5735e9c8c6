"""dissolved_regions' tasks: the dissolve of a file, and the parts of a fanned-out or
hierarchical one (planned in spatial/union.py)."""

import base64
import time

import geopandas
import numpy as np
import pandas as pd
import pyarrow as pa
import shapely

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.settings import check_aggregations
from geoiso_dagster.spatial import faults, io, thumbnail, union
from geoiso_dagster.spatial.union import (
    FEATURE_COUNT_COLUMN,
    polygonal_parts,
    repair,
    union_group,
    write_dissolved,
)
from geoiso_dagster.task_api import progress


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
        repaired, count = repair(geometries, source)
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
    facts = write_dissolved(result, output, source)
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
    facts = write_dissolved(result, output, source)
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
