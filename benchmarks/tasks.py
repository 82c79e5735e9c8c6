"""Worker tasks for the benchmarks (and the memory test): this project's tasks, plus the
whole-frame pipeline they are measured against. A pool runs them with
PoolSettings(task_module="benchmarks.tasks")."""

import geopandas

from geoiso_dagster.spatial.tasks import *  # noqa: F403 - the real tasks, too


def whole_frame(source: str, target_crs: str, dissolve_by: str) -> dict:
    """The pipeline without streaming: read the whole file, to_crs, make_valid,
    dissolve with the unary union. Returns each group's area (what the streamed
    pipeline must reproduce); the pool measures its peak RSS."""
    frame = geopandas.read_file(source, engine="pyogrio").to_crs(target_crs)
    frame["geometry"] = frame.make_valid()
    dissolved = frame.dissolve(by=dissolve_by, aggfunc="first")
    return {"areas": {str(k): float(a) for k, a in dissolved.geometry.area.items()}}
