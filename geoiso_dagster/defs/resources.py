"""SpatialWorkerPool: the Dagster resource that owns the worker processes of a run."""

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Optional

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from geoiso_dagster.formats import ALLOWED_GDAL_DRIVERS
from geoiso_dagster.pool import PoolSettings, TaskResult, WorkerPool
from geoiso_dagster.pool.pool import ProgressCallback

# The module of the built-in tasks ("ingest", "inspect", ...): the pool is told it here.
TASK_MODULE = "geoiso_dagster.spatial.tasks"


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
    sandbox: str = Field(
        default="auto",
        description="The kernel's sandbox around every task (docs/security.md): auto (on "
        "where the kernel has Landlock ABI 6), on (refuse to run without it), off.",
    )
    address_space_headroom_mb: Optional[int] = Field(
        default=None,
        description="RLIMIT_AS headroom over a fresh worker's mappings (backstop to the RSS "
        "ceiling); unset: 2 x memory_limit_mb. Every setting here is bounded (pool.check_bounds).",
    )
    # Fixed in code when the definitions are built (SpatialWorkerPool.fixed), never by run
    # config: a field here would let whoever launches a run (the launchpad, a sensor's
    # run request) choose the module the workers import or give them LD_PRELOAD.
    task_module: ClassVar[str] = TASK_MODULE
    allowed_gdal_drivers: ClassVar[frozenset[str]] = ALLOWED_GDAL_DRIVERS
    worker_env: ClassVar[Mapping[str, str]] = MappingProxyType({})

    _pool: Optional[WorkerPool] = PrivateAttr(default=None)

    @classmethod
    def fixed(
        cls,
        *,
        task_module: str | None = None,
        worker_env: Mapping[str, str] | None = None,
        **config,
    ) -> "SpatialWorkerPool":
        """A pool resource whose workers get `worker_env` (added to or overriding their
        environment) and run bare task names from `task_module` (tests stand a module of
        their own in for the built-in tasks). Both are class attributes of a subclass made
        here: run config can set the resource's fields, never these."""
        attributes = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__annotations__": {"task_module": ClassVar[str], "worker_env": ClassVar[Mapping]},
            "task_module": cls.task_module if task_module is None else task_module,
            "worker_env": MappingProxyType({**cls.worker_env, **(worker_env or {})}),
        }
        return type(cls)(cls.__name__, (cls,), attributes)(**config)

    @classmethod
    def from_env(cls, **fixed) -> "SpatialWorkerPool":
        """Defaults, overridden by GEOISO_POOL_* variables (documented in the README);
        `fixed`: task_module and worker_env, as SpatialWorkerPool.fixed takes them."""
        env = os.environ
        settings: dict = {}
        for field, cast in (
            ("max_workers", int),
            ("memory_limit_mb", int),
            ("task_timeout_s", float),
            ("start_method", str),
            ("max_tasks_per_worker", int),
            ("gdal_cachemax_mb", int),
            ("sandbox", str),
        ):
            value = env.get(f"GEOISO_POOL_{field.upper()}")
            if value:
                settings[field] = cast(value)
        return cls.fixed(**fixed, **settings) if fixed else cls(**settings)

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
            allowed_gdal_drivers=self.allowed_gdal_drivers,
            sandbox=self.sandbox,
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
