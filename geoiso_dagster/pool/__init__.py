"""The process pool: isolated, supervised worker processes for the geo work."""

from geoiso_dagster.pool.pool import PoolSettings, TaskResult, WorkerPool

__all__ = ["PoolSettings", "TaskResult", "WorkerPool"]
