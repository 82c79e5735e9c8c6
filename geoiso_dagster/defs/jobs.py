from dagster import AssetSelection, define_asset_job

from geoiso_dagster.defs.assets import GROUP

# Three steps, each at most task_timeout_s (900 s) x 3 attempts plus backoff: a run
# past three hours is stuck, and run monitoring (dagster.yaml) cancels it.
MAX_RUNTIME_S = 3 * 3600

# All three assets (and their checks) for one source file.
geo_pipeline = define_asset_job(
    "geo_pipeline",
    selection=AssetSelection.groups(GROUP),
    tags={"dagster/max_runtime": str(MAX_RUNTIME_S)},
    description="raw_features -> reprojected_features -> dissolved_regions for one source file.",
)
