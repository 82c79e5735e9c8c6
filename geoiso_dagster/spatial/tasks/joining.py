"""Tasks for steps of the user's own (defs/own_steps.py): the standard facts of the file
a step wrote, and the join of a fanned-out step's parts."""

import json
from pathlib import Path

import geopandas
import pyarrow as pa
import pyarrow.parquet as pq

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.fsutil import atomic_path
from geoiso_dagster.spatial import io, stream
from geoiso_dagster.task_api import progress


def describe(path: str) -> dict:
    """The facts the catalog shows of a file a step wrote (spatial/io.describe), or bad
    input naming it when it is not GeoParquet with a CRS.

    A file written by plain `to_parquet` (GeoParquet 1.0, no bbox covering column, one
    row group) is rewritten first in the form every output here has (io.write_geoparquet):
    the contract asks for GeoParquet, and the readers downstream count on the covering."""
    target = Path(path)
    if not target.exists():
        raise BadInputError(path, "the step wrote no file")
    try:
        geo = io.geo_metadata(target)
        version = geo.get("version")
        covered = "bbox" in geo["columns"][geo["primary_column"]].get("covering", {})
        if version != "1.1.0" or not covered:
            io.write_geoparquet(geopandas.read_parquet(target), target)
            wrote = f"GeoParquet {version}" + ("" if covered else " without a bbox covering")
            progress(
                "rewrote the step's output as GeoParquet 1.1 with a bbox covering column "
                f"(the step wrote {wrote})"
            )
        return io.describe(target)
    except (KeyError, pa.ArrowException, json.JSONDecodeError) as exc:
        raise BadInputError(path, f"is not GeoParquet: {type(exc).__name__}: {exc}") from None


def join_parts(parts: list[str], output: str) -> dict:
    """The parts of a fan-out (each GeoParquet, in the order of the source's row groups,
    so of its Hilbert order) as one GeoParquet file: rows in part order, the parts'
    `geo` metadata merged (geometry types and bboxes united), row groups of the usual
    size, written atomically."""
    tables = [pq.read_table(part) for part in parts]
    # An empty part declares no geometry types and no bbox: it must not blank the whole's.
    holding = [table for table in tables if table.num_rows] or tables
    geo = stream.merged_geo([json.loads(table.schema.metadata[b"geo"]) for table in holding])
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise BadInputError(output, f"the parts do not share a schema: {exc}") from None
    table = table.replace_schema_metadata(
        {**(tables[0].schema.metadata or {}), b"geo": json.dumps(geo).encode()}
    )
    options = stream.writer_options(table.schema, geo["primary_column"])
    try:
        with atomic_path(Path(output)) as tmp:
            with pq.ParquetWriter(tmp, table.schema, **options) as writer:
                writer.write_table(table, row_group_size=io.ROW_GROUP_ROWS)
    except OSError as exc:
        raise io.os_error(Path(output), exc, "writing") from exc
    return io.describe(Path(output))
