"""The code location: one Definitions object for `dagster dev`, the CLI and the tests."""

from dagster import Definitions, in_process_executor

from geoiso_dagster import paths
from geoiso_dagster.defs.assets import geo_assets
from geoiso_dagster.defs.jobs import geo_pipeline
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.sensors import build_inbox_sensor, build_remainder_sensor

# A data root this project cannot serve (gs://..., s3:/typo) stops the code location from
# loading, with the reason, instead of being taken as a relative folder.
paths.configured_root()

# In-process executor: one worker pool per run, shared by its steps; the pool, not the
# executor, supplies the process isolation (and starts ~2.5x faster per run).
defs = Definitions(
    assets=geo_assets,
    jobs=[geo_pipeline],
    sensors=[build_inbox_sensor(geo_pipeline), build_remainder_sensor(geo_pipeline)],
    resources={"spatial_pool": SpatialWorkerPool.from_env()},
    executor=in_process_executor,
)
