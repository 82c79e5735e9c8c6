"""raw_features -> reprojected_features -> dissolved_regions, one GeoParquet file per
source file. The steps here only orchestrate: the work runs in the worker pool."""

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    BackfillPolicy,
    Config,
    Failure,
    MaterializeResult,
    asset,
)
from dagster._utils.warnings import BetaWarning  # not exported; the one to silence here
from pydantic import Field

from geoiso_dagster import paths
from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.batch import produce_batch
from geoiso_dagster.defs.checks import check_specs
from geoiso_dagster.defs.envelope import (
    FileWork,
    discard,
    metadata,
    publish,
    stage_and_judge,
    sweep,
)
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.retries import raise_for
from geoiso_dagster.errors import BadInputError, GeoisoError, UnsafeNameError
from geoiso_dagster.fsutil import temp_path_for
from geoiso_dagster.settings import check_aggregations, check_layer, check_target_crs

GROUP = "geo"
# Dagster concurrency pool of the heavy steps; dagster.yaml limits how many runs use it.
POOL = "geoiso_workers"
# A run may carry this many source files (partitions) at most: the sensor's batches and
# the UI's backfills are cut to it (DESIGN.md, Run model).
BATCH_MAX_FILES = 125
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


def _source_and_output(key: str, asset_name: str, upstream: str | None) -> tuple[str, Path]:
    """(source, final output) of this step for partition `key`, both inside the data root;
    UnsafeNameError (bad input) for a key that could escape it."""
    output = paths.output_path(asset_name, key)
    source = paths.output_path(upstream, key) if upstream else paths.source_path(key)
    return str(source), output


def _checked(check, *args) -> None:
    """Run a settings check; a refused setting is bad input (not retried)."""
    try:
        check(*args)
    except BadInputError as exc:
        raise Failure(description=f"Bad config: {exc.cause}", allow_retries=False) from None


def _step(
    context: AssetExecutionContext,
    pool: SpatialWorkerPool,
    asset_name: str,
    plan: Callable[[str], FileWork],
) -> Iterator:
    """The step for one file (a run of one partition) or for a batch (a run over a range
    of partitions, defs/batch.py); `plan` says what to do for a partition key."""
    try:
        if not context.has_partition_key:
            yield from produce_batch(context, pool, asset_name, context.partition_keys, plan)
            return
        try:
            work = plan(context.partition_key)
        except UnsafeNameError as exc:
            raise Failure(description=f"Bad input: {exc}", allow_retries=False) from None
        yield from _produce(context, pool, asset_name, work)
    except GeoisoError as exc:  # raised here, not in a worker: the object store's answers
        raise_for(context, exc)


def _produce(
    context: AssetExecutionContext, pool: SpatialWorkerPool, asset_name: str, work: FileWork
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Run the task into a staged file, read it back in a worker and judge it; publish it
    under its final name only when every check passed. A failed check leaves the previous
    good output in place and fails the step (the checks are blocking), so nothing
    downstream runs on it."""
    output = work.output
    sweep(output)
    staged = temp_path_for(output)
    try:
        judged = stage_and_judge(fanout.StepRunner(context, pool), asset_name, work, staged)
        if judged.passed:
            if seconds := publish(staged, output):
                context.log.info(f"{asset_name}: published to the bucket in {seconds:.1f} s")
            yield MaterializeResult(
                metadata=metadata(judged.result, output), check_results=judged.checks
            )
        else:
            context.log.error(
                f"{asset_name}: blocking check failed on {', '.join(judged.failed_checks())}; "
                f"{output.name} keeps its previous version"
            )
            yield from judged.checks
    finally:
        discard(staged)
        with contextlib.suppress(GeoisoError):  # the step's own error matters more
            sweep(output)  # what a killed worker of this step left behind


def _geo_asset(name: str, upstream: AssetsDefinition | None, library: str):
    """The shared shape of the three assets: one GeoParquet file per source file,
    published only with its blocking checks passed; downstream follows upstream; a
    backfill from the UI runs its files in batches, like the sensor."""

    def decorate(fn):
        with warnings.catch_warnings():  # backfill_policy is a Dagster beta parameter
            warnings.simplefilter("ignore", BetaWarning)
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
                backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=BATCH_MAX_FILES),
            )(fn)

    return decorate


@_geo_asset("raw_features", upstream=None, library="gdal")
def raw_features(
    context: AssetExecutionContext, config: IngestConfig, spatial_pool: SpatialWorkerPool
):
    """The source file as stored in GeoParquet 1.1: GeoPackage, shapefile (also zipped),
    GeoJSON, FlatGeobuf or GeoParquet. Refused with a clear error when it has no CRS,
    no features, or several layers and no `layer` setting."""
    if config.layer is not None:
        _checked(check_layer, config.layer)

    def plan(key: str) -> FileWork:
        source, output = _source_and_output(key, "raw_features", None)
        return FileWork(
            output,
            Path(source),
            lambda runner, staged, source: fanout.ingest(
                runner, source, staged, layer=config.layer
            ),
            lambda source: {"source": source, "layer": config.layer},
            from_inbox=True,
        )

    yield from _step(context, spatial_pool, "raw_features", plan)


@_geo_asset("reprojected_features", upstream=raw_features, library="proj")
def reprojected_features(
    context: AssetExecutionContext, config: ReprojectConfig, spatial_pool: SpatialWorkerPool
):
    """raw_features in the target CRS (config target_crs, default EPSG:4326). When the
    source is already in that CRS the geometries are copied untouched."""
    _checked(check_target_crs, config.target_crs)

    def plan(key: str) -> FileWork:
        source, output = _source_and_output(key, "reprojected_features", "raw_features")
        return FileWork(
            output,
            Path(source),
            lambda runner, staged, source: fanout.reproject(
                runner, source, staged, config.target_crs
            ),
            lambda source: {"expected_crs": config.target_crs},
        )

    yield from _step(context, spatial_pool, "reprojected_features", plan)


@_geo_asset("dissolved_regions", upstream=reprojected_features, library="geos")
def dissolved_regions(
    context: AssetExecutionContext, config: DissolveConfig, spatial_pool: SpatialWorkerPool
):
    """One valid (multi)polygon per value of config dissolve_by: invalid geometries
    repaired with make_valid, only polygonal parts kept, other columns aggregated, plus
    a feature_count column."""
    _checked(check_aggregations, config.aggfunc, dict(config.aggregations))
    options = {
        "dissolve_by": config.dissolve_by,
        "aggfunc": config.aggfunc,
        "aggregations": dict(config.aggregations),
    }

    def plan(key: str) -> FileWork:
        source, output = _source_and_output(key, "dissolved_regions", "reprojected_features")
        return FileWork(
            output,
            Path(source),
            lambda runner, staged, source: fanout.dissolve(runner, source, staged, **options),
            lambda source: {
                "expected_crs_of": source,
                "unique_key": config.dissolve_by,
                "geometries": "all",
            },
        )

    yield from _step(context, spatial_pool, "dissolved_regions", plan)


geo_assets = [raw_features, reprojected_features, dissolved_regions]
