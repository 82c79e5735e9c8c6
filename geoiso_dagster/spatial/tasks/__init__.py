"""The tasks the pool runs, by name: path in, GeoParquet path out, facts returned.

One module per operation, each importing the geo stack (worker layer):
  reading        ingest (a whole source, or one range of a fan-out), survey, concatenate
  reprojection   reproject, drop_m
  dissolving     dissolve and the parts of a fanned-out or hierarchical dissolve
  readback       inspect (the facts the blocking checks judge), inspect_object
  joining        describe, join_parts (steps of the user's own, defs/own_steps.py)
  doctor         environment
  ../transfer    fetch, upload: files between an S3 root and this host's mirror
"""

from geoiso_dagster.spatial.tasks.dissolving import (
    FEATURE_COUNT_COLUMN,
    dissolve,
    dissolve_chunk,
    join_dissolved,
    plan_dissolve,
    union_partials,
)
from geoiso_dagster.spatial.tasks.doctor import environment
from geoiso_dagster.spatial.tasks.joining import describe, join_parts
from geoiso_dagster.spatial.tasks.readback import inspect, inspect_object
from geoiso_dagster.spatial.tasks.reading import concatenate, ingest, survey
from geoiso_dagster.spatial.tasks.reprojection import drop_m, reproject
from geoiso_dagster.spatial.transfer import download_staged, fetch, upload

__all__ = [
    "FEATURE_COUNT_COLUMN",
    "concatenate",
    "describe",
    "dissolve",
    "dissolve_chunk",
    "download_staged",
    "drop_m",
    "environment",
    "fetch",
    "ingest",
    "inspect",
    "inspect_object",
    "join_parts",
    "join_dissolved",
    "plan_dissolve",
    "reproject",
    "survey",
    "union_partials",
    "upload",
]
