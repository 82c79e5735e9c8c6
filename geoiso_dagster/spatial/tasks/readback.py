"""The read-back: what a staged output (a file, or an object of an S3 root) really
holds, judged by the blocking checks, and what its source declares."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely

from geoiso_dagster import paths
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.fsutil import temp_path_for
from geoiso_dagster.records import ReadBack
from geoiso_dagster.spatial import faults, integrity, io, remote, sources
from geoiso_dagster.spatial.ingest import gdal_info
from geoiso_dagster.spatial.tasks.reprojection import target_crs_of
from geoiso_dagster.spatial.transfer import download_staged
from geoiso_dagster.task_api import resolve_task


def inspect(
    path: str,
    expected_crs: str | None = None,
    expected_crs_of: str | None = None,
    unique_key: str | None = None,
    geometries: str = "sample",
    source: str | None = None,
    layer: str | None = None,
) -> ReadBack:
    """Independent facts about a file just written, for the asset checks: read back from
    disk, trusting nothing the writer said.

    `geometries`: "all" decodes and validates every geometry (the dissolved output, one
    row per region); "sample" decodes the first row group only, so that checking a
    million-row input does not cost as much as producing it. Every output's bbox (from
    the covering column's statistics) is compared with what its CRS can hold; with
    `source` (raw_features), the source's own declared counts are read again.
    """
    faults.at_start("inspect")
    target = Path(path)
    facts: ReadBack = {"path": path, "readable": False}
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
        expected = target_crs_of(expected_crs, path)
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


def inspect_object(relative: str, read_back: str = "inspect", **kwargs) -> ReadBack:
    """The `read_back` task (an output kind's: inspect() for GeoParquet) on a staged object
    of an S3 root, downloaded again from the bucket: the bytes checked are the bytes that
    will be published, not the local file they came from."""
    judge = resolve_task(read_back, __package__)
    copy = temp_path_for(paths.data_root() / relative)
    try:
        info = download_staged(relative, copy)
        facts = judge(path=str(copy), **kwargs)
    finally:
        copy.unlink(missing_ok=True)
    facts["path"] = f"s3://{remote.s3_root().bucket}/{info.key}"
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
