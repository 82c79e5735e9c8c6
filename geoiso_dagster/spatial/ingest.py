"""Streaming ingest: any vector file GDAL reads, or GeoParquet, to GeoParquet in
bounded memory, batch by batch, never the whole frame.

GDAL sources stream as Arrow batches (pyogrio.open_arrow) and their WKB is written as
GDAL made it (ISO WKB); GeoParquet sources stream row group by row group. Each batch is
checked before it is written (valid UTF-8 text, finite coordinates) and the file-level
checks run at the end (feature count as declared, at least one feature), so a refused
input never leaves an output. The `geo` metadata (geometry types and bbox of the whole
file) is only known at the end; it goes into the footer's key-value metadata, which is
why the Arrow schema is not stored (store_schema=False): readers then take the schema
and its `geo` key from the footer.

`features=[skip, count]` ingests only that range of features (one part of a fan-out over
the workers; parts are put together by `stream.concatenate`).
"""

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyogrio
import pyproj
import shapely

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.settings import check_crs
from geoiso_dagster.spatial import declared, faults, integrity, io, sources
from geoiso_dagster.spatial.io import BBOX_FIELDS, bbox_column
from geoiso_dagster.spatial.stream import TableSink

GEOMETRY = "geometry"


class _Source:
    """What a source streams: Arrow batches, the name of the WKB column, its CRS, how
    many rows the range must hold (None: unknown), and whether the WKB is re-encoded."""

    def __init__(self, batches, geometry, crs, expected, reencode, drop=(), first_row=0):
        self.batches, self.geometry, self.crs = batches, geometry, crs
        self.expected, self.reencode, self.drop = expected, reencode, set(drop)
        self.first_row = first_row  # the source row of the range's first feature


def survey(source: str | Path, layer: str | None = None, scratch: str | None = None) -> dict:
    """How a source can be split: its feature count (-1: unknown without a full read),
    and either the rows of each GeoParquet row group or whether GDAL can start reading at
    any feature without reading those before it (fast SetNextByIndex). An archive is
    never split: it is unpacked once, by the one task that reads it. With `scratch` (the
    output), a local source is pinned beside it (sources.pin) and surveyed as pinned;
    its identity is returned, for every part to read that same file."""
    path = io.ref(source)
    if scratch is None:
        return _survey(path, layer)
    with sources.pinned(path, Path(scratch)) as (pinned, identity):
        facts = _survey(pinned, layer)
    return facts if identity is None else {**facts, "identity": list(identity)}


def _survey(path: "Path | str", layer: str | None) -> dict:
    sources.check_source_files(path)
    io.check_readable(path)
    suffix = sources.suffix_of(path)
    if suffix in sources.ARCHIVE_SUFFIXES:
        return {"features": -1, "splittable": False}
    if suffix in io.PARQUET_SUFFIXES:
        with sources.source_access(path):  # an object: its footer read once
            integrity.check_parquet(path)
            with io.reading(path):
                metadata = io.open_parquet(path).metadata
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        return {"features": metadata.num_rows, "row_groups": groups, "splittable": len(groups) > 1}
    with sources.source_access(path):
        if suffix == ".fgb":  # before the count is trusted to plan the parts
            sources.fgb_features(path)
        elif suffix == ".gpkg":
            sources.check_gpkg_layer(path, layer)
        info = gdal_info(path, str(path), layer)
    return {
        "features": int(info["features"]),
        "splittable": info["features"] > 0
        and bool(info.get("capabilities", {}).get("fast_set_next_by_index")),
    }


def gdal_info(path: "Path | str", what: str, layer: str | None) -> dict:
    """pyogrio's read_info of the one layer to read, once the driver GDAL detects is the
    one the suffix names. A file with several layers must be told which (config `layer`):
    reading the first and ignoring the rest would publish part of the data."""
    try:
        with io.reading(path):
            layers = pyogrio.list_layers(io.gdal_name(path))
    except BadInputError as exc:
        if "not recognized" not in exc.cause:
            raise
        raise BadInputError(
            what,
            f"is not readable as {sources.FORMATS.get(sources.suffix_of(path))} data, the format "
            f"its suffix names (formats allowed here: {sorted(sources.ALLOWED_SUFFIXES)})",
        ) from None
    names = [str(name) for name, _ in layers]
    if layer is None and len(names) > 1:
        with io.reading(path):
            counts = [pyogrio.read_info(io.gdal_name(path), layer=n)["features"] for n in names]
        listed = ", ".join(f"{n!r} ({c} features)" for n, c in zip(names, counts, strict=True))
        raise BadInputError(
            what,
            f"has {len(names)} layers: {listed}; name the one to read with the setting "
            '`layer` (raw_features config, or "layer" in the file\'s .geoiso.json sidecar)',
        )
    if layer is not None and layer not in names:
        raise BadInputError(what, f"has no layer {layer!r}; its layers: {names}")
    with io.reading(path):
        info = pyogrio.read_info(io.gdal_name(path), layer=layer)
    sources.check_driver(path, info.get("driver"))
    return info


def ingest_file(
    source: Path,
    tmp: Path,
    features: list[int] | None = None,
    batch_rows: int = io.SLICE_ROWS,
    group_rows: int = io.ROW_GROUP_ROWS,
    on_batch: Callable[[int, int | None], None] | None = None,
    part: bool = False,
    layer: str | None = None,
    identity: list | None = None,
) -> dict:
    """Stream `source` into GeoParquet at `tmp` (`part`: a part file for `concatenate`,
    see stream.TableSink); returns the rows written and the `geo` metadata. The source
    passes the jail first and is read as pinned there (spatial/sources.py; `identity`:
    the survey's, for a part); a `.zip` is unpacked beside `tmp` and its one dataset
    read, every error still naming the source."""
    with sources.opened(source, tmp, identity) as (path, what):
        faults.at_point("ingest", "pinned")  # checked, not yet read (a swap test's moment)
        try:
            return _ingest(path, tmp, features, batch_rows, group_rows, on_batch, part, layer)
        except BadInputError as exc:  # (about a pinned file: named by `opened`)
            if path == source or sources.suffix_of(what) not in sources.ARCHIVE_SUFFIXES:
                raise
            raise BadInputError(what, f"(member {path.name}) {exc.cause}") from None


def _ingest(source, tmp, features, batch_rows, group_rows, on_batch, part, layer) -> dict:
    io.check_readable(source)
    suffix = sources.suffix_of(source)
    if suffix in io.PARQUET_SUFFIXES:
        integrity.check_parquet(source)
    elif suffix == ".shp":
        integrity.check_shapefile(source)
    elif suffix == ".fgb" and features is None:  # a part's file was walked by the survey
        sources.fgb_features(source)
    elif suffix == ".gpkg" and features is None:
        sources.check_gpkg_layer(source, layer)
    with _open(source, features, batch_rows, layer) as src:
        if suffix in declared.GEOJSON_SUFFIXES:  # before any row: the cause, not its symptom
            integrity.check_geojson_crs(source, sources.geojson_crs_names(source), src.crs)
        rows, geo, runs = _write(source, tmp, src, group_rows, on_batch, part)
    if src.expected is not None and rows != src.expected:
        raise BadInputError(
            str(source), f"declares {src.expected} features but {rows} could be read"
        )
    return {"rows": rows, "geo": geo, "runs": runs}


def _guarded(source: Path, batches) -> Iterator[pa.RecordBatch]:
    """The batches, with any error raised while reading them named by file and cause
    (errors while writing are the output's, and are named so by the task)."""
    iterator = iter(batches)
    while True:
        with io.reading(source):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


@contextlib.contextmanager
def _open(
    source: Path, features: list[int] | None, batch_rows: int, layer: str | None
) -> Iterator[_Source]:
    if sources.suffix_of(source) in io.PARQUET_SUFFIXES:
        with io.reading(source):
            src = _parquet_source(source, features, batch_rows)
        src.batches = _guarded(source, src.batches)
        yield src
        return
    skip, count = features if features is not None else (0, None)
    declared = gdal_info(source, str(source), layer)["features"]
    expected = None
    if declared >= 0:
        expected = declared - skip if count is None else min(count, declared - skip)
    options = {"skip_features": skip} if skip else {}
    with contextlib.ExitStack() as stack:
        with io.reading(source):
            meta, reader = stack.enter_context(
                pyogrio.open_arrow(
                    io.gdal_name(source),
                    layer=layer,
                    use_pyarrow=True,
                    batch_size=batch_rows,
                    **options,
                )
            )
        geometry = meta.get("geometry_name") or "wkb_geometry"
        if geometry not in reader.schema.names:
            raise BadInputError(str(source), "has no geometry column")
        crs = _crs(source, meta.get("crs"))
        batches = _guarded(source, reader if count is None else _first(reader, count))
        yield _Source(batches, geometry, crs, expected, reencode=False, first_row=skip)


def _first(batches, count: int) -> Iterator[pa.RecordBatch]:
    """The first `count` rows of a stream (pyogrio's Arrow reader has no max_features)."""
    for batch in batches:
        if batch.num_rows >= count:
            yield batch.slice(0, count)
            return
        count -= batch.num_rows
        yield batch


def _parquet_source(source: Path, features: list[int] | None, batch_rows: int) -> _Source:
    parquet = io.open_parquet(source, pre_buffer=False)
    geo = io.geo_metadata(source)
    primary = geo.get("primary_column")
    column = geo.get("columns", {}).get(primary)
    if column is None or primary not in parquet.schema_arrow.names:
        raise BadInputError(str(source), "has no geometry column")
    crs = io.geoparquet_crs(source, geo)
    if column.get("encoding", "WKB").upper() != "WKB":
        # GeoArrow-native encodings: decoded whole by geopandas, then streamed as WKB
        # (bounded memory is for WKB, the encoding nearly every writer uses).
        frame = io.read_geoparquet_frame(source).to_wkb()
        table = pa.Table.from_pandas(pd.DataFrame(frame), preserve_index=False)
        return _Source(iter(table.to_batches(batch_rows)), primary, crs, None, reencode=True)
    covering = io.covering_column(geo)
    if features is None:
        groups = list(range(parquet.num_row_groups))
    else:  # a part of a fan-out over row groups: [first group, number of groups]
        groups = list(range(features[0], features[0] + features[1]))
    first_row = sum(
        parquet.metadata.row_group(g).num_rows for g in range(groups[0] if groups else 0)
    )
    batches = (
        batch
        for group in groups
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group])
    )
    return _Source(
        batches,
        primary,
        crs,
        None,
        reencode=True,
        drop=[covering] if covering else [],
        first_row=first_row,
    )


def _crs(source: Path, declared: str | None) -> pyproj.CRS:
    if not declared:
        raise BadInputError(
            str(source),
            "has no coordinate reference system (for a shapefile: its .prj file is missing); "
            "set the CRS at the source, this pipeline never guesses one",
        )
    check_crs(declared, str(source), "the CRS GDAL read")  # as declared, checked before
    try:
        crs = pyproj.CRS.from_user_input(declared)
    except pyproj.exceptions.CRSError as exc:
        raise BadInputError(str(source), f"declares a CRS PROJ does not know: {exc}") from exc
    return io.check_horizontal(crs, str(source), "its declared CRS")


def _write(
    source: Path, tmp: Path, src: _Source, group_rows: int, on_batch, part: bool
) -> tuple[int, dict]:
    """Check and convert batch by batch; write row groups of `group_rows` rows."""
    limits = io.coordinate_limits(src.crs)
    sink = TableSink(tmp, GEOMETRY, part, store_schema=False, domain=limits, group_rows=group_rows)
    rows = 0
    pending: list[pa.Table] = []
    types: set[str] = set()
    low, high = np.full(2, np.inf), np.full(2, -np.inf)
    nonfinite: list[int] = []
    outside: list[int] = []
    try:
        for batch in src.batches:
            if batch.num_rows == 0:
                continue
            table = pa.Table.from_batches([batch])
            attributes = [n for n in table.column_names if n != src.geometry and n not in src.drop]
            _check_names(source, attributes)
            for name in attributes:
                _check_text(source, name, table[name])
            wkb = table[src.geometry].to_numpy(zero_copy_only=False)
            geometries = _decode(source, wkb)
            bad = integrity.nonfinite(geometries)
            nonfinite.extend((np.flatnonzero(bad) + rows).tolist())
            bounds = shapely.bounds(geometries)
            outside.extend(
                (np.flatnonzero(io.outside_limits(bounds, limits) & ~bad) + rows).tolist()
            )
            if not np.isnan(bounds).all():
                low = np.fmin(low, np.nanmin(bounds[:, :2], axis=0))
                high = np.fmax(high, np.nanmax(bounds[:, 2:], axis=0))
            types |= _type_names(geometries)
            if src.reencode:  # GeoParquet from elsewhere may hold EWKB; write ISO WKB
                wkb = shapely.to_wkb(geometries, flavor="iso", output_dimension=4)
            out = table.select(attributes)
            out = out.append_column(GEOMETRY, pa.array(wkb, type=pa.binary()))
            out = out.append_column("bbox", bbox_column(bounds))
            order = np.arange(src.first_row + rows, src.first_row + rows + out.num_rows)
            out = out.append_column(io.SOURCE_ROW, pa.array(order, type=pa.int64()))
            out = out.replace_schema_metadata(None)
            pending.append(out)
            rows += out.num_rows
            if sum(t.num_rows for t in pending) >= group_rows:
                sink.write(pa.concat_tables(pending))
                pending.clear()
            if on_batch is not None:
                on_batch(rows, src.expected)
        if pending:
            sink.write(pa.concat_tables(pending))
            pending.clear()
        if nonfinite:
            raise BadInputError(
                str(source),
                f"has NaN or infinite coordinates in {len(nonfinite)} rows, e.g. {nonfinite[:5]}",
            )
        if outside:
            raise BadInputError(
                str(source),
                f"has coordinates outside what its CRS ({io.crs_label(src.crs)}) can hold "
                f"({_limits_text(src.crs, limits)}) in {len(outside)} rows, e.g. {outside[:5]}; "
                "is the declared CRS the data's real one?",
            )
        if rows == 0:
            raise BadInputError(str(source), "has no features (0 rows)")
        bbox = [*low.tolist(), *high.tolist()] if np.isfinite(low).all() else None
        geo = _geo(src.crs, types, bbox)
        runs = sink.close(geo)
    except BaseException:
        sink.abort()
        raise
    return rows, geo, runs


def _limits_text(crs: pyproj.CRS, limits: tuple[float, float, float, float]) -> str:
    if crs.is_geographic:
        return f"longitude within +/-{limits[2]:g}, latitude within +/-{limits[3]:.6g}"
    return f"within {limits[2]:g} units of the origin"


def _geo(crs: pyproj.CRS, types: set[str], bbox: list[float] | None) -> dict:
    column = {
        "encoding": "WKB",
        "crs": crs.to_json_dict(),
        "geometry_types": sorted(types),
        "covering": {"bbox": {f: ["bbox", f] for f in BBOX_FIELDS}},
    }
    if bbox is not None:
        column["bbox"] = bbox
    return {"version": "1.1.0", "primary_column": GEOMETRY, "columns": {GEOMETRY: column}}


def _check_names(source: Path, attributes: list[str]) -> None:
    clash = sorted({GEOMETRY, "bbox", io.SOURCE_ROW} & set(attributes))
    if clash:
        raise BadInputError(
            str(source),
            f"has attribute column(s) named {clash}, which GeoParquet output reserves for the "
            "geometry, its bbox and each feature's row in the source; rename them at the "
            "source",
        )


def _check_text(source: Path, name: str, column: pa.ChunkedArray) -> None:
    """GeoParquet must hold UTF-8; GDAL passes the bytes of a mis-declared encoding on,
    and Arrow's Parquet reader does not check a dictionary's values (nor text nested in
    a list or struct): every column but fixed-width ones is validated in full."""
    if pa.types.is_primitive(column.type):
        return
    try:
        column.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise BadInputError(
            str(source),
            f"column {name!r} holds text that is not valid UTF-8 ({exc}); declare the "
            "file's encoding (a .cpg for shapefiles) or re-encode it as UTF-8",
        ) from None


def _decode(source: Path, wkb: np.ndarray) -> np.ndarray:
    try:
        return shapely.from_wkb(wkb)
    except NotImplementedError as exc:
        raise BadInputError(str(source), io.curves_cause(exc)) from exc
    except shapely.errors.GEOSException as exc:
        if "unknown wkb type" in str(exc).lower():  # curves, by their WKB type codes
            raise BadInputError(str(source), io.curves_cause(exc)) from exc
        raise BadInputError(str(source), f"holds a geometry that is not valid WKB: {exc}") from exc


def _type_names(geometries: np.ndarray) -> set[str]:
    present = geometries[~shapely.is_missing(geometries)]
    codes = shapely.get_type_id(present) * 2 + shapely.has_z(present)
    return {
        io.GEOMETRY_TYPE_NAMES[int(code) // 2] + (" Z" if code % 2 else "")
        for code in np.flatnonzero(np.bincount(codes, minlength=16))
    }
