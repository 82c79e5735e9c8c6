"""The code location: the built-in assets plus this team's two steps.

dagster dev -m team_steps.definitions
"""

from geoiso_dagster import Reference, build_definitions, geo_asset

# The countries, cut to the mask layer (<data root>/reference/mask.parquet); large files
# fan out over the workers, each reading only the part of the mask it reaches.
clipped_countries = geo_asset(
    "clipped_countries",
    task="geoiso_dagster.ops:clip",
    upstream="reprojected_features",
    inputs={"mask": Reference("mask.parquet")},
    splittable=True,
)

# The regions, each with the number and names of the places inside it: our own function.
regions_with_places = geo_asset(
    "regions_with_places",
    task="team_steps.steps:count_places",
    upstream="dissolved_regions",
    inputs={"places": Reference("places.parquet")},
)

defs = build_definitions([clipped_countries, regions_with_places])
