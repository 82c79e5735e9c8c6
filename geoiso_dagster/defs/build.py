"""build_definitions: the code location's Definitions, with a team's own assets added."""

from collections.abc import Mapping, Sequence

from dagster import AssetsDefinition, Definitions, in_process_executor

from geoiso_dagster import dataroot
from geoiso_dagster.defs.assets import GROUP, geo_assets
from geoiso_dagster.defs.jobs import geo_pipeline
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.sensors import (
    build_inbox_sensor,
    build_remainder_sensor,
    in_dependency_order,
)
from geoiso_dagster.defs.steps import sidecar_rules


def build_definitions(
    extra_assets: Sequence[AssetsDefinition] = (),
    *,
    worker_env: Mapping[str, str] | None = None,
) -> Definitions:
    """The built-in assets, the inbox sensor, the pool resource (GEOISO_POOL_* settings)
    and the executor, plus `extra_assets` (geo_asset's, in the group "geo" unless they say
    otherwise: the sensor's runs then make them too).

    worker_env: variables added to (or overriding) every worker's environment, fixed here:
    run config cannot set them (SpatialWorkerPool.fixed).
    A data root this project cannot serve (gs://..., s3:/typo) fails here, with the reason,
    instead of being taken as a relative folder."""
    dataroot.check_setting()
    pool = SpatialWorkerPool.from_env(worker_env=worker_env) if worker_env else None
    # In-process executor: one worker pool per run, shared by its steps; the pool, not the
    # executor, supplies the process isolation (and no child process per step to start).
    assets = [*geo_assets, *extra_assets]
    # The job's assets (its selection is the group), in the order a remainder makes them.
    in_job = in_dependency_order(assets, GROUP)
    # What a source's sidecar may set: the settings the job's steps declare.
    rules = sidecar_rules([a for a in assets if a.group_names_by_key.get(a.key) == GROUP])
    return Definitions(
        assets=assets,
        jobs=[geo_pipeline],
        sensors=[
            build_inbox_sensor(geo_pipeline, rules),
            build_remainder_sensor(geo_pipeline, in_job),
        ],
        resources={"spatial_pool": pool or SpatialWorkerPool.from_env()},
        executor=in_process_executor,
    )
