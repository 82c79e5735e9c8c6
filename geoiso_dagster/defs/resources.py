"""SpatialWorkerPool: the Dagster resource that owns the worker processes of a run."""

import os
from typing import Optional

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from geoiso_dagster.pool import PoolSettings, TaskResult, WorkerPool
from geoiso_dagster.pool.pool import TASK_MODULE, ProgressCallback


class SpatialWorkerPool(ConfigurableResource):
    """Runs every heavy geo step in an isolated, supervised worker process.

    One pool per run (the code location uses the in-process executor), shared by the
    steps; it bounds concurrency (max_workers) and memory (memory_limit_mb each).
    """

    max_workers: int = Field(default=2, description="Worker processes at most.")
    memory_limit_mb: int = Field(
        default=4096, description="RSS ceiling of one worker; over it the worker is stopped."
    )
    task_timeout_s: float = Field(
        default=900.0, description="A task running longer has its worker killed (retried)."
    )
    start_method: str = Field(
        default="forkserver",
        description="'forkserver' (geo stack preloaded, fast) or 'spawn' (slowest, plainest).",
    )
    max_tasks_per_worker: int = Field(
        default=0,
        description="0: workers serve one run (one file or a batch) and are replaced after any "
        "crash, timeout or memory stop; 1: a fresh process per task; N: recycle after N.",
    )
    gdal_cachemax_mb: int = Field(default=256, description="GDAL_CACHEMAX of each worker.")
    address_space_headroom_mb: Optional[int] = Field(
        default=None,
        description="RLIMIT_AS headroom over a fresh worker's mappings (backstop to the RSS "
        "ceiling); unset: 2 x memory_limit_mb; 0: no rlimit.",
    )
    worker_env: dict[str, str] = Field(
        default_factory=dict, description="Extra or overriding worker environment variables."
    )

    task_module: str = Field(
        default=TASK_MODULE,
        description="Module whose functions the workers run; change only to extend or test.",
    )

    _pool: Optional[WorkerPool] = PrivateAttr(default=None)

    @classmethod
    def from_env(cls) -> "SpatialWorkerPool":
        """Defaults, overridden by GEOISO_POOL_* variables (documented in the README)."""
        env = os.environ
        settings: dict = {}
        for field, cast in (
            ("max_workers", int),
            ("memory_limit_mb", int),
            ("task_timeout_s", float),
            ("start_method", str),
            ("max_tasks_per_worker", int),
            ("gdal_cachemax_mb", int),
        ):
            value = env.get(f"GEOISO_POOL_{field.upper()}")
            if value:
                settings[field] = cast(value)
        return cls(**settings)

    def settings(self) -> PoolSettings:
        return PoolSettings(
            max_workers=self.max_workers,
            memory_limit_mb=self.memory_limit_mb,
            task_timeout_s=self.task_timeout_s,
            start_method=self.start_method,
            max_tasks_per_worker=self.max_tasks_per_worker,
            gdal_cachemax_mb=self.gdal_cachemax_mb,
            address_space_headroom_mb=self.address_space_headroom_mb,
            env_overrides=dict(self.worker_env),
            task_module=self.task_module,
        )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._pool = WorkerPool(self.settings()).start()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            raise RuntimeError("SpatialWorkerPool used outside a run (no setup_for_execution)")
        return self._pool

    def run(
        self, function: str, *, on_progress: ProgressCallback | None = None, **kwargs
    ) -> TaskResult:
        return self.pool.run(function, on_progress=on_progress, **kwargs)

    async def run_async(
        self, function: str, *, on_progress: ProgressCallback | None = None, **kwargs
    ) -> TaskResult:
        return await self.pool.run_async(function, on_progress=on_progress, **kwargs)
