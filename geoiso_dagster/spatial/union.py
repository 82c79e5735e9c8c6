"""Dissolves of any size in bounded memory: parts sized by what a worker may hold, and
the hierarchical union of a group too large for one worker.

`plan` (a task) reads the key column only and cuts the sorted keys into ranges whose
rows fit PART_SHARE of a worker's ceiling (measured at 1M polygons: a dissolve part
peaks at about the fresh worker's 120 MB plus 2.2 times its Arrow data); each range is
one `dissolve` task. A group larger than that share on its own is a giant: its rows are
cut into chunks of row groups (at least one; their Arrow data at most the share over
CHUNK_EXPANSION, as a chunk is decoded and unioned at once; the file is in Hilbert
order, so a chunk is a compact piece of space and its union small), each chunk is
repaired and unioned in a worker (`dissolve_chunk`), and the partial unions are
unioned in turn, FAN_IN at a time (`union_partials`), until one is left. The group's
attributes are aggregated the same way, from partial statistics (sum and count for a
mean; count, mean and sum of squared deviations for a variance; the values themselves
for a median or a count of distinct values: those alone grow with the group). Partial
unions that together are more than a worker may hold fail naming the group, its size
and the ceiling.
"""

import json
from pathlib import Path

import geopandas
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.fsutil import atomic_path
from geoiso_dagster.spatial import io
from geoiso_dagster.task_api import progress

# The count of source features in each dissolved row (every dissolve writes it).
FEATURE_COUNT_COLUMN = "feature_count"
# The share of a worker's ceiling one dissolve part may hold as Arrow data.
PART_SHARE = 0.1
# A chunk of a giant group is decoded and unioned at once: measured, 200k polygons (24.6
# MB of WKB) peaked 320 MB over the worker's start, 13 times their Arrow data. A chunk is
# at least one row group.
CHUNK_EXPANSION = 13
FAN_IN = 16  # partial unions per union_partials task
# A coverage union is exact when the group's polygons really form a coverage; the union's
# area must then equal the sum of their areas (to floating-point rounding).
COVERAGE_AREA_TOLERANCE = 1e-9
_WKB = "__geoiso_wkb"
_ORDER = "__geoiso_order"  # a row's source position, for "first" and "last"
_SEP = "\x1f"  # between a column's name and a statistic's, in a partial file


def budget_bytes(memory_limit_mb: int) -> float:
    return memory_limit_mb * 2**20 * PART_SHARE


# --- geometry -----------------------------------------------------------------------


def polygonal_parts(geometries: np.ndarray) -> np.ndarray:
    """Keep only the polygonal part of each geometry (None where there is none).

    make_valid may return GeometryCollections holding lines and points beside the
    polygons; a dissolve of regions must only union areas.
    """
    out = np.array(geometries, dtype=object, copy=True)
    types = shapely.get_type_id(out)
    polygon_ids = {3, 6}  # Polygon, MultiPolygon
    for i in np.flatnonzero(~np.isin(types, list(polygon_ids))):
        geom = out[i]
        if geom is None:
            continue
        parts = shapely.get_parts(shapely.get_parts(geom))  # flatten collections, multis
        polys = [p for p in parts if shapely.get_type_id(p) == 3 and not p.is_empty]
        out[i] = shapely.multipolygons(polys) if polys else None
    return out


def repair(geometries: np.ndarray, what: str = "") -> tuple[np.ndarray, int]:
    """make_valid only the rows is_valid flags (buffer(0) would drop a bowtie's lobe),
    by GEOS's "structure" method: a MultiPolygon's area is the union of its parts (the
    "linework" default keeps only where an odd number of parts cover, so two overlapping
    parts lost their overlap, every check green) less its holes; a bowtie keeps both
    lobes. Area is then checked where it must be conserved: a repaired MultiPolygon of
    valid parts covers at least its largest part and at most their sum."""
    invalid = ~shapely.is_valid(geometries) & ~shapely.is_missing(geometries)
    repaired = np.array(geometries, dtype=object, copy=True)
    if invalid.any():
        rows = np.flatnonzero(invalid)
        repaired[rows] = shapely.make_valid(
            repaired[rows], method="structure", keep_collapsed=False
        )
        _check_area_kept(what, geometries[rows], repaired[rows], rows)
    return repaired, int(invalid.sum())


def _check_area_kept(what: str, before: np.ndarray, after: np.ndarray, rows: np.ndarray) -> None:
    """A repaired MultiPolygon of valid parts has the area of its parts' union, computed
    again by GEOS's overlay union (an independent path from make_valid's)."""
    multi = shapely.get_type_id(before) == 6
    for geometry, fixed, row in zip(before[multi], after[multi], rows[multi], strict=True):
        parts = shapely.get_parts(geometry)
        if not shapely.is_valid(parts).all():
            continue  # an invalid part has no area to conserve (a bowtie's shoelace is 0)
        expected, area = float(shapely.union_all(parts).area), float(shapely.area(fixed))
        if abs(area - expected) > COVERAGE_AREA_TOLERANCE * max(expected, 1e-300):
            raise BadInputError(
                what or "a dissolve's input",
                f"row {int(row)}: repairing its MultiPolygon gave area {area:.9g}, not the "
                f"{expected:.9g} of its parts' union; refused rather than published with "
                "area lost or made",
            )


def union_group(geometries: np.ndarray) -> tuple[object, bool]:
    """(union, used_coverage). Tries the coverage union, 13-15x faster than the unary
    union on a valid coverage, and keeps it only if it verifies cheaply: valid, and its
    area equal to the sum of the parts' (overlaps would make it smaller). Otherwise the
    unary union. shapely.coverage_is_valid would gate it exactly but costs 5x the union."""
    expected = float(shapely.area(geometries).sum())
    try:
        union = shapely.coverage_union_all(geometries)
    except shapely.errors.GEOSException:
        union = None
    if (
        union is not None
        and shapely.is_valid(union)
        and abs(union.area - expected) <= COVERAGE_AREA_TOLERANCE * max(expected, 1e-300)
    ):
        return union, True
    return shapely.union_all(geometries), False


def attribute_columns(names, dissolve_by: str, *geometry_columns) -> list[str]:
    """The columns a dissolve aggregates (its key among them): all but the geometry, its
    bbox, and the source row numbers unless they are the key."""
    return [
        n for n in names if n not in geometry_columns and (n != io.SOURCE_ROW or n == dissolve_by)
    ]


# --- the plan -----------------------------------------------------------------------


def sorted_keys(source: str, dissolve_by: str) -> pd.Index:
    """The distinct keys in sorted order: the numbering (rank) every task of one dissolve
    shares, null and NaN left out as pandas groups them."""
    return _sorted(_distinct(io.open_parquet(source), dissolve_by))[1]


def _distinct(parquet: pq.ParquetFile, dissolve_by: str) -> pa.Array:
    """The key column's distinct values, row group by row group: memory holds one row
    group's keys and the distinct ones, however long the file (reading the whole column
    of 10M rows took 80 MB, and ranking it with pandas hundreds more)."""
    seen = None
    for group in range(parquet.num_row_groups):
        values = pc.unique(parquet.read_row_group(group, columns=[dissolve_by]).column(0))
        seen = values if seen is None else pc.unique(pa.concat_arrays([seen, values]))
    return seen if seen is not None else pa.array([], parquet.schema_arrow.field(dissolve_by).type)


def _ranks(column, seen: pa.Array, rank_of: np.ndarray) -> np.ndarray:
    """Each key's rank (-1: null or NaN) for one row group's key column."""
    at = pc.index_in(column, value_set=seen).fill_null(-1).to_numpy(zero_copy_only=False)
    return np.where(at >= 0, rank_of[np.maximum(at, 0)], -1)


def _sorted(distinct: pa.Array) -> tuple[np.ndarray, pd.Index]:
    """(rank of each distinct value, -1 for null or NaN; the values in pandas' order)."""
    values = pd.Series(distinct.to_pandas())
    present = values[values.notna()].sort_values(kind="stable")
    rank_of = np.full(len(values), -1, dtype=np.int64)
    rank_of[present.index.to_numpy()] = np.arange(len(present))
    return rank_of, pd.Index(present.to_numpy(), dtype=present.dtype)


def plan(source: str, dissolve_by: str, memory_limit_mb: int, min_parts: int) -> dict:
    """How to dissolve `source` within `memory_limit_mb` a worker: `parts`, ranges
    [first, end) of sorted keys, at least `min_parts` when there are enough keys, each
    at most a worker's share; `giants`, the groups larger than a share on their own,
    each with the chunks of row groups its rows are unioned in. `part_row_groups`: the
    row groups that hold each part's keys, so that a part reads only those (the file is
    in Hilbert order, and keys that name places are then in few row groups). `parts` is
    None when one task can do it all."""
    parquet = io.open_parquet(source)
    metadata = parquet.metadata
    rows = metadata.num_rows
    group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    data = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    per_row = data / max(rows, 1)
    budget = budget_bytes(memory_limit_mb)
    seen = _distinct(parquet, dissolve_by)
    rank_of, uniques = _sorted(seen)

    def ranks_by_group():  # one row group's keys at a time: memory stays flat
        for group in range(len(group_rows)):
            column = parquet.read_row_group(group, columns=[dissolve_by]).column(0)
            yield group, _ranks(column, seen, rank_of)

    counts = np.zeros(len(uniques), dtype=np.int64)
    null_keys = 0
    for _, codes in ranks_by_group():
        null_keys += int((codes < 0).sum())
        counts += np.bincount(codes[codes >= 0], minlength=len(uniques))
    if len(uniques) == 0 or (data <= budget and min_parts <= 1):
        return {"parts": None, "giants": [], "groups": len(uniques)}
    sizes = counts * per_row
    giant = sizes > budget
    parts = _ranges(np.flatnonzero(~giant), sizes[~giant], budget, min_parts)
    part_of_rank = np.full(len(uniques) + 1, -1, dtype=np.int64)  # the last: null keys
    for index, (first, end) in enumerate(parts):
        part_of_rank[first:end] = index
    giant_ranks = np.flatnonzero(giant).tolist()
    part_row_groups: list[list[int]] = [[] for _ in parts]
    in_group = {rank: np.zeros(len(group_rows), dtype=np.int64) for rank in giant_ranks}
    for group, codes in ranks_by_group():
        for part in np.unique(part_of_rank[codes]).tolist():  # -1 (null) picks the last
            if part >= 0:
                part_row_groups[part].append(group)
        for rank in giant_ranks:
            in_group[rank][group] = int((codes == rank).sum())
    giants = []
    for rank in giant_ranks:
        chunks: list[list[int]] = []
        held = 0.0
        for group in np.flatnonzero(in_group[rank]).tolist():
            size = in_group[rank][group] * per_row
            if not chunks or held + size > budget / CHUNK_EXPANSION:
                chunks.append([])
                held = 0.0
            chunks[-1].append(group)
            held += size
        giants.append(
            {
                "rank": rank,
                "key": _key_text(uniques[rank]),
                "rows": int(in_group[rank].sum()),
                "mb": round(float(sizes[rank]) / 2**20, 1),
                "chunks": chunks,
            }
        )
    return {
        "parts": parts,
        "part_row_groups": part_row_groups,
        "giants": giants,
        "groups": len(uniques),
        "dropped_null_keys": null_keys,
        "bytes_per_row": round(per_row, 1),
        "budget_mb": round(budget / 2**20, 1),
    }


def _ranges(ranks: np.ndarray, sizes: np.ndarray, budget: float, min_parts: int) -> list:
    """Cut `ranks` (sorted; giants left out) into ranges of about equal size: as few as
    keep each within `budget`, at least `min_parts`. Each key goes to the part its
    middle falls in; a part that still exceeds the budget (a large key at its edge)
    means one part more."""
    if len(ranks) == 0:
        return []
    total = float(sizes.sum())
    parts = max(min_parts, int(np.ceil(total / budget)), 1)
    while True:
        share = total / parts
        middle = np.cumsum(sizes) - sizes / 2
        index = np.minimum((middle // share).astype(np.int64), parts - 1)
        if np.bincount(index, weights=sizes).max() <= budget or parts >= len(ranks):
            break
        parts += 1
    cuts = np.flatnonzero((np.diff(index) != 0) | (np.diff(ranks) != 1)) + 1
    return [[int(run[0]), int(run[-1]) + 1] for run in np.split(ranks, cuts) if len(run)]


def _key_text(key) -> str:
    return str(key)[:200]


# --- a giant group's chunks and partials -------------------------------------------


def dissolve_chunk(
    source: str,
    output: str,
    dissolve_by: str,
    rank: int,
    row_groups: list[int],
    aggfunc: str = "first",
    aggregations: dict[str, str] | None = None,
) -> dict:
    """Repair and union the rows of group `rank` in `row_groups`, and their attributes'
    partial statistics: one partial of a giant group, written to `output`."""
    key = sorted_keys(source, dissolve_by)[rank]
    table, geometry_name, _ = io.read_geoparquet_table(
        source, where=(dissolve_by, [key]), row_groups=row_groups
    )
    attributes = table.drop_columns([geometry_name]).to_pandas()
    if io.SOURCE_ROW not in attributes.columns or dissolve_by == io.SOURCE_ROW:
        attributes[_ORDER] = np.arange(len(attributes))  # no source order: the file's
    else:
        attributes = attributes.rename(columns={io.SOURCE_ROW: _ORDER})
    geometries = shapely.from_wkb(table.column(geometry_name).to_numpy(zero_copy_only=False))
    del table
    repaired, repaired_count = repair(geometries, source)
    polygonal = polygonal_parts(repaired)
    ok = ~shapely.is_missing(polygonal) & ~shapely.is_empty(polygonal)
    union, coverage = union_group(polygonal[ok]) if ok.any() else (None, False)
    kept = attributes[ok].sort_values(_ORDER, kind="stable")
    stats = _partial_stats(kept, dissolve_by, aggfunc, aggregations or {})
    stats.update(
        {
            "__rows": len(kept),
            "__repaired": repaired_count,
            "__dropped": int((~ok).sum()),
            "__coverage": int(coverage),
        }
    )
    _write_partial(stats, union, output)
    progress(
        f"unioned {len(kept)} features of group {_key_text(key)!r} in row groups "
        f"{row_groups[0]}-{row_groups[-1]}",
        done=len(kept),
        unit="features",
    )
    return {"path": output, "rows": len(kept), "wkb_bytes": _wkb_size(union)}


def union_partials(
    partials: list[str],
    output: str,
    source: str,
    dissolve_by: str,
    rank: int,
    group_rows: int,
    memory_limit_mb: int,
    final: bool,
    aggfunc: str = "first",
    aggregations: dict[str, str] | None = None,
) -> dict:
    """Union partials of group `rank` into one: another partial, or with `final` the
    group's row as a dissolve part writes it (key, aggregates, feature count, geometry)."""
    frames = [pq.read_table(p).to_pandas() for p in partials]
    sizes = sum(int(f[_WKB].map(lambda b: len(b) if b is not None else 0).sum()) for f in frames)
    budget = budget_bytes(memory_limit_mb)
    if sizes > budget:
        uniques = sorted_keys(source, dissolve_by)
        raise BadInputError(
            source,
            f"group {_key_text(uniques[rank])!r} of {dissolve_by!r} ({group_rows} features) "
            f"does not fit a worker even unioned in parts: {len(partials)} of its partial "
            f"unions hold {sizes / 2**20:.1f} MB of geometry, more than the "
            f"{budget / 2**20:.1f} MB a worker may hold under its ceiling "
            f"memory_limit_mb={memory_limit_mb}; raise the ceiling or dissolve by a finer key",
        )
    stats = pd.concat(frames, ignore_index=True)
    geometries = shapely.from_wkb(stats.pop(_WKB).to_numpy())
    present = geometries[~shapely.is_missing(geometries)]
    union, coverage = union_group(present) if len(present) else (None, False)
    combined = _combine_stats(stats, aggfunc, aggregations or {})
    combined.update(
        {
            "__rows": int(stats["__rows"].sum()),
            "__repaired": int(stats["__repaired"].sum()),
            "__dropped": int(stats["__dropped"].sum()),
            "__coverage": int(stats["__coverage"].min()) * int(coverage),
        }
    )
    if not final:
        _write_partial(combined, union, output)
        return {"path": output, "rows": combined["__rows"]}
    return _write_group(combined, union, output, source, dissolve_by, rank, aggfunc, aggregations)


def write_dissolved(result, output: str, source: str) -> dict:
    """write_geoparquet, with values an aggregation made that Parquet cannot hold (mixed
    types, say) named as the input's problem."""
    try:
        return io.write_geoparquet(result, output)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise BadInputError(
            source, f"the aggregated columns cannot be written: {type(exc).__name__}: {exc}"
        ) from None


def _write_group(stats, union, output, source, dissolve_by, rank, aggfunc, aggregations) -> dict:
    """The giant group's row, as `dissolve` writes a part's rows."""
    schema = io.read_schema(io.ref(source))
    geo = io.geo_metadata(io.ref(source))
    geometry_name = geo["primary_column"]
    crs = io.geoparquet_crs(io.ref(source), geo)
    uniques = sorted_keys(source, dissolve_by)
    columns = attribute_columns(schema.names, dissolve_by, geometry_name, io.covering_column(geo))
    facts = {
        "repaired_geometries": stats["__repaired"],
        "dropped_non_polygonal": stats["__dropped"],
        "coverage_union_groups": stats["__coverage"],
        "unary_union_groups": 1 - stats["__coverage"],
        "dropped_null_keys": 0,
    }
    if union is None:  # nothing polygonal in the whole group: it drops out
        return {"path": None, "rows": 0, **facts}
    values = final_values(stats, columns, dissolve_by, aggfunc, aggregations or {})
    frame = pd.DataFrame({dissolve_by: [uniques[rank]], **{c: [v] for c, v in values.items()}})
    frame[FEATURE_COUNT_COLUMN] = stats["__rows"]
    frame[geometry_name] = [union]
    result = geopandas.GeoDataFrame(frame, geometry=geometry_name, crs=crs)
    written = write_dissolved(result, output, source)
    return {**written, **facts}


def _wkb_size(geometry) -> int:
    return len(shapely.to_wkb(geometry)) if geometry is not None else 0


def _write_partial(stats: dict, union, output: str) -> None:
    columns = {name: [value] for name, value in stats.items()}
    columns[_WKB] = [shapely.to_wkb(union) if union is not None else None]
    frame = pd.DataFrame(columns)
    with atomic_path(Path(output)) as tmp:
        frame.to_parquet(tmp, index=False)


# Statistics whose partials combine by the same function.
_SAME = {"first", "last", "min", "max", "sum", "prod"}


def _functions(columns, dissolve_by, aggfunc, aggregations) -> dict[str, str]:
    return {c: aggregations.get(c, aggfunc) for c in columns if c != dissolve_by}


def _partial_stats(frame: pd.DataFrame, dissolve_by, aggfunc, aggregations) -> dict:
    """One chunk's statistics, as pandas computes them for a group (the same calls the
    plain dissolve makes, so the same types and the same treatment of nulls)."""
    out: dict = {}
    grouped = frame.groupby(dissolve_by, sort=False)
    columns = [c for c in frame.columns if c != _ORDER]
    for column, name in _functions(columns, dissolve_by, aggfunc, aggregations).items():
        series = grouped[column]
        if name in ("first", "last"):  # the value, and where it stands in the source
            present = frame.loc[frame[column].notna(), [column, _ORDER]]
            pick = None if present.empty else present.iloc[0 if name == "first" else -1]
            out[f"{column}{_SEP}{name}"] = None if pick is None else _plain(pick[column])
            out[f"{column}{_SEP}{name}_at"] = None if pick is None else int(pick[_ORDER])
        elif name in _SAME or name == "count":
            value = series.agg(name).iloc[0] if len(frame) else None
            out[f"{column}{_SEP}{name}"] = _plain(value)
        elif name == "mean":
            out[f"{column}{_SEP}sum"] = _plain(series.sum().iloc[0]) if len(frame) else 0
            out[f"{column}{_SEP}count"] = int(series.count().iloc[0]) if len(frame) else 0
        elif name in ("var", "std"):
            values = frame[column].dropna().astype(float)
            out[f"{column}{_SEP}n"] = len(values)
            out[f"{column}{_SEP}mean"] = float(values.mean()) if len(values) else 0.0
            out[f"{column}{_SEP}m2"] = (
                float(((values - values.mean()) ** 2).sum()) if len(values) else 0.0
            )
        else:  # median, nunique: the values themselves
            out[f"{column}{_SEP}values"] = json.dumps(frame[column].dropna().tolist(), default=str)
    return out


def _plain(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _combine_stats(stats: pd.DataFrame, aggfunc, aggregations) -> dict:
    """Partials' statistics combined: into a partial's again (the names stay), which
    `_write_group` reads as the group's final values."""
    out: dict = {}
    names = {c.split(_SEP)[0] for c in stats.columns if _SEP in c}
    for column in sorted(names):
        name = aggregations.get(column, aggfunc)
        key = f"{column}{_SEP}"
        if name in ("first", "last"):
            at = stats[key + name + "_at"].dropna()
            if at.empty:
                out[key + name], out[key + name + "_at"] = None, None
            else:
                pick = at.idxmin() if name == "first" else at.idxmax()
                out[key + name] = _plain(stats.loc[pick, key + name])
                out[key + name + "_at"] = int(at[pick])
        elif name in _SAME:
            out[key + name] = _plain(getattr(stats[key + name], name)())
        elif name == "count":
            out[key + name] = int(stats[key + name].sum())
        elif name == "mean":
            out[key + "sum"] = _plain(stats[key + "sum"].sum())
            out[key + "count"] = int(stats[key + "count"].sum())
        elif name in ("var", "std"):
            n, mean, m2 = _chan(stats[key + "n"], stats[key + "mean"], stats[key + "m2"])
            out.update({key + "n": n, key + "mean": mean, key + "m2": m2})
        else:
            values = [v for text in stats[key + "values"] for v in json.loads(text)]
            out[key + "values"] = json.dumps(values, default=str)
    return out


def _chan(counts, means, m2s) -> tuple[int, float, float]:
    """Counts, means and sums of squared deviations of parts, combined (Chan et al.)."""
    n, mean, m2 = 0, 0.0, 0.0
    for count, part_mean, part_m2 in zip(counts, means, m2s, strict=True):
        if count == 0:
            continue
        total = n + count
        delta = part_mean - mean
        mean += delta * count / total
        m2 += part_m2 + delta**2 * n * count / total
        n = total
    return int(n), float(mean), float(m2)


def final_values(stats: dict, columns, dissolve_by, aggfunc, aggregations) -> dict:
    """The group's aggregate per column from its combined statistics."""
    out = {}
    for column, name in _functions(columns, dissolve_by, aggfunc, aggregations).items():
        key = f"{column}{_SEP}"
        if name in _SAME or name == "count":
            out[column] = stats.get(key + name)
        elif name == "mean":
            count = stats[key + "count"]
            out[column] = stats[key + "sum"] / count if count else None
        elif name in ("var", "std"):
            n, m2 = stats[key + "n"], stats[key + "m2"]
            var = m2 / (n - 1) if n > 1 else None
            out[column] = var if name == "var" or var is None else float(np.sqrt(var))
        else:
            values = pd.Series(json.loads(stats[key + "values"]))
            out[column] = values.median() if name == "median" else int(values.nunique())
    return out
