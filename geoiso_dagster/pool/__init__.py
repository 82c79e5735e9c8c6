"""The process pool: isolated, supervised worker processes for the geo work.

Usable without Dagster (README, "The pool on its own"):

    async with WorkerPool(PoolSettings(max_workers=2)) as pool:
        result = await pool.run_async("my_team.steps:clip_one", source=..., output=...)

`progress(message, **numbers)`, called inside a worker function, reaches the caller's
on_progress callback (in Dagster: the run's log).
"""

from geoiso_dagster.pool.pool import PoolSettings, TaskResult, WorkerPool
from geoiso_dagster.task_api import progress

__all__ = ["PoolSettings", "TaskResult", "WorkerPool", "progress"]
