from dagster import AssetSelection, define_asset_job

from geoiso_dagster.defs.assets import GROUP

# All three assets (and their checks) for one source file.
geo_pipeline = define_asset_job(
    "geo_pipeline",
    selection=AssetSelection.groups(GROUP),
    description="raw_features -> reprojected_features -> dissolved_regions for one source file.",
)
