"""Real tasks, except that ingest hangs inside a C call: a stuck GDAL read."""

import ctypes

from geoiso_dagster.spatial.tasks import *  # noqa: F403


def ingest(**kwargs) -> dict:
    ctypes.CDLL(None).sleep(600)
    return {}
