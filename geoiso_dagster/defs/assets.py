"""raw_features -> reprojected_features -> dissolved_regions, one GeoParquet file per
source file. The steps here only orchestrate: the work runs in the worker pool."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)
from pydantic import Field

from geoiso_dagster import paths
from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.checks import check_results, check_specs
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.retries import run_task
from geoiso_dagster.errors import BadInputError, UnsafeNameError
from geoiso_dagster.fsutil import publish, sweep_stale_temps, temp_path_for
from geoiso_dagster.pool import TaskResult
from geoiso_dagster.settings import check_aggregations, check_layer, check_target_crs

GROUP = "geo"
# Dagster concurrency pool of the heavy steps; dagster.yaml limits how many runs use it.
POOL = "geoiso_workers"
# Step-specific facts that go to the catalog as they are.
_STEP_FACTS = (
    "transformed",
    "dropped_m",
    "repaired_geometries",
    "dropped_null_keys",
    "dropped_non_polygonal",
    "coverage_union_groups",
    "unary_union_groups",
    "fanned_out_over",
)
# Downstream waits until its upstream's blocking checks passed (or pass in this run).
_AFTER_CHECKS = AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()


class IngestConfig(Config):
    layer: Optional[str] = Field(
        default=None,
        description="The layer to read, required when the source holds several (a "
        "GeoPackage with two tables); a file with one layer needs none.",
    )


class ReprojectConfig(Config):
    target_crs: str = Field(
        default="EPSG:4326", description="Any CRS PROJ understands: 'EPSG:6933', WKT, PROJJSON."
    )


class DissolveConfig(Config):
    dissolve_by: str = Field(default="region_id", description="Column whose values name a region.")
    aggfunc: str = Field(
        default="first", description="pandas aggregation for the other columns (first, sum, ...)."
    )
    aggregations: dict[str, str] = Field(
        default_factory=dict, description="Per-column aggregation, overriding aggfunc."
    )


def _paths(context: AssetExecutionContext, asset_name: str, upstream: str | None):
    """(source, final output) of this step's partition, both inside the data root."""
    try:
        key = context.partition_key
        output = paths.output_path(asset_name, key)
        source = paths.output_path(upstream, key) if upstream else paths.source_path(key)
    except UnsafeNameError as exc:
        raise Failure(description=f"Bad input: {exc}", allow_retries=False) from None
    return str(source), output


def _checked(check, *args) -> None:
    """Run a settings check; a refused setting is bad input (not retried)."""
    try:
        check(*args)
    except BadInputError as exc:
        raise Failure(description=f"Bad config: {exc.cause}", allow_retries=False) from None


def _metadata(result: TaskResult, path: Path) -> dict:
    facts = result.facts
    metadata = {
        "dagster/row_count": MetadataValue.int(facts["rows"]),
        "dagster/column_schema": TableSchema(
            columns=[TableColumn(name=c["name"], type=c["type"]) for c in facts["columns"]]
        ),
        "dagster/uri": MetadataValue.text(path.as_uri()),
        "path": MetadataValue.path(str(path)),
        "crs": MetadataValue.text(facts["crs"]),
        "crs_name": MetadataValue.text(facts["crs_name"]),
        "bbox": MetadataValue.json({"minx_miny_maxx_maxy": facts["bbox"]}),
        "geometry_types": MetadataValue.text(", ".join(facts["geometry_types"])),
        "bytes": MetadataValue.int(facts["bytes"]),
        "row_groups": MetadataValue.int(facts["row_groups"]),
        "duration_s": MetadataValue.float(result.duration_s),
        "worker_peak_rss_mb": MetadataValue.float(result.peak_rss_mb),
        "worker_pid": MetadataValue.int(result.pid),
    }
    for library, version in facts["versions"].items():
        metadata[f"{library}_version"] = MetadataValue.text(version)
    if "thumbnail_png" in facts:
        metadata["map"] = MetadataValue.md(
            f"![{facts['rows']} regions](data:image/png;base64,{facts['thumbnail_png']})"
        )
    for extra in _STEP_FACTS:
        if extra in facts:
            metadata[extra] = facts[extra]
    return metadata


def _produce(
    context: AssetExecutionContext,
    pool: SpatialWorkerPool,
    asset_name: str,
    output: Path,
    function: str | Callable[[Path], TaskResult],
    inspect_kwargs: dict | None = None,
    **task_kwargs,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Run the task into a staged file, read it back in a worker and judge it; publish it
    under its final name only when every check passed. A failed check leaves the previous
    good output in place and fails the step (the checks are blocking), so nothing
    downstream runs on it."""
    sweep_stale_temps(output)
    staged = temp_path_for(output)
    try:
        if callable(function):  # a step that plans its own tasks (fanout)
            result = function(staged)
        else:
            result = run_task(context, pool, function, output=str(staged), **task_kwargs)
        seen = run_task(context, pool, "inspect", path=str(staged), **(inspect_kwargs or {}))
        checks = check_results(asset_name, result.facts, seen.facts)
        if all(check.passed for check in checks):
            publish(staged, output)
            yield MaterializeResult(metadata=_metadata(result, output), check_results=checks)
        else:
            yield from checks
    finally:
        staged.unlink(missing_ok=True)
        sweep_stale_temps(output)  # what a killed worker of this step left behind


def _geo_asset(name: str, upstream: AssetsDefinition | None, library: str):
    """The shared shape of the three assets: one GeoParquet file per source file,
    published only with its blocking checks passed; downstream follows upstream."""
    return asset(
        name=name,
        partitions_def=source_files,
        group_name=GROUP,
        deps=[upstream] if upstream else None,
        output_required=False,
        check_specs=check_specs(name),
        automation_condition=_AFTER_CHECKS if upstream else None,
        kinds={"geoparquet", library},
        pool=POOL,
    )


@_geo_asset("raw_features", upstream=None, library="gdal")
def raw_features(
    context: AssetExecutionContext, config: IngestConfig, spatial_pool: SpatialWorkerPool
):
    """The source file as stored in GeoParquet 1.1: GeoPackage, shapefile (also zipped),
    GeoJSON, FlatGeobuf or GeoParquet. Refused with a clear error when it has no CRS,
    no features, or several layers and no `layer` setting."""
    source, output = _paths(context, "raw_features", None)
    if config.layer is not None:
        _checked(check_layer, config.layer)
    yield from _produce(
        context,
        spatial_pool,
        "raw_features",
        output,
        lambda staged: fanout.ingest(
            fanout.StepRunner(context, spatial_pool), source, staged, layer=config.layer
        ),
        inspect_kwargs={"source": source, "layer": config.layer},
    )


@_geo_asset("reprojected_features", upstream=raw_features, library="proj")
def reprojected_features(
    context: AssetExecutionContext, config: ReprojectConfig, spatial_pool: SpatialWorkerPool
):
    """raw_features in the target CRS (config target_crs, default EPSG:4326). When the
    source is already in that CRS the geometries are copied untouched."""
    source, output = _paths(context, "reprojected_features", "raw_features")
    _checked(check_target_crs, config.target_crs)
    yield from _produce(
        context,
        spatial_pool,
        "reprojected_features",
        output,
        lambda staged: fanout.reproject(
            fanout.StepRunner(context, spatial_pool), source, staged, config.target_crs
        ),
        inspect_kwargs={"expected_crs": config.target_crs},
    )


@_geo_asset("dissolved_regions", upstream=reprojected_features, library="geos")
def dissolved_regions(
    context: AssetExecutionContext, config: DissolveConfig, spatial_pool: SpatialWorkerPool
):
    """One valid (multi)polygon per value of config dissolve_by: invalid geometries
    repaired with make_valid, only polygonal parts kept, other columns aggregated, plus
    a feature_count column."""
    source, output = _paths(context, "dissolved_regions", "reprojected_features")
    _checked(check_aggregations, config.aggfunc, dict(config.aggregations))
    yield from _produce(
        context,
        spatial_pool,
        "dissolved_regions",
        output,
        lambda staged: fanout.dissolve(
            fanout.StepRunner(context, spatial_pool),
            source,
            staged,
            dissolve_by=config.dissolve_by,
            aggfunc=config.aggfunc,
            aggregations=dict(config.aggregations),
        ),
        inspect_kwargs={
            "expected_crs_of": source,
            "unique_key": config.dissolve_by,
            "geometries": "all",
        },
    )


geo_assets = [raw_features, reprojected_features, dissolved_regions]
