"""WorkerPool: runs named worker-layer tasks in isolated, supervised processes.

Built on pebble's ProcessPool, which kills the worker of a task that times out and
replaces workers that die. On top of it: the worker environment, a memory ceiling
the worker enforces on itself, errors mapped to the project's types, progress events,
awaitable tasks, and a teardown that leaves no process behind.
"""

import asyncio
import concurrent.futures
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pebble
import psutil

from geoiso_dagster import dataroot
from geoiso_dagster.errors import (
    BadInputError,
    GeoisoError,
    MemoryLimitError,
    StorageAccessError,
    TaskError,
    TransientIOError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from geoiso_dagster.formats import ALLOWED_GDAL_DRIVERS
from geoiso_dagster.pool import _forkserver, cgroup, sandbox
from geoiso_dagster.pool._events import EventListener
from geoiso_dagster.pool.env import worker_env
from geoiso_dagster.pool.worker import (
    MEMORY_EXIT_CODE,
    WorkerSettings,
    initialize,
    kill_all,
    kill_group,
    run_task,
    start_ticks,
)
from geoiso_dagster.task_api import check_task_ref, is_qualified

log = logging.getLogger(__name__)

# pebble's pool manager polls every CONSTS.sleep_unit (0.1 s) for workers that exited
# and starts their replacements then; a task waiting for a fresh worker waited up to
# that long. At 10 ms a fresh worker per task costs about half as much (benchmarks/
# isolation.py measures it). Only this process's pools are affected.
pebble.common.CONSTS.sleep_unit = min(pebble.common.CONSTS.sleep_unit, 0.01)
START_METHODS = ("forkserver", "spawn")
# Bounds of the settings whoever launches a run may set (run config): without them the
# launchpad took max_workers 12 with memory_limit_mb 1,000,000, no address-space backstop
# and a timeout of 1e12 s, the whole host. The machine's (or its cgroup's) CPUs and
# memory cap them: WORKERS_PER_CPU workers a CPU this process may use, and a worker's
# ceiling within the memory it may use (the run's cgroup caps all of them together).
WORKERS_PER_CPU = 4
MIN_MEMORY_MB = 64
MAX_TASK_TIMEOUT_S = 86_400.0  # a day
MIN_TASK_TIMEOUT_S = 0.5
MAX_TASKS_PER_WORKER = 1_000_000


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_memory_mb() -> int:
    """The memory this process may use: its cgroup's limit, else the machine's."""
    physical = psutil.virtual_memory().total // 2**20
    limit = cgroup.memory_limit_mb()
    return min(physical, limit) if limit else physical


def check_bounds(s: "PoolSettings") -> None:
    """ValueError naming the first setting out of its bounds, and the bounds."""
    cpus, memory = usable_cpus(), usable_memory_mb()
    workers_max = WORKERS_PER_CPU * cpus
    checks = [
        ("max_workers", s.max_workers, 1, workers_max, f"{WORKERS_PER_CPU} x {cpus} CPUs"),
        (
            "memory_limit_mb",
            s.memory_limit_mb,
            MIN_MEMORY_MB,
            memory,
            f"the {memory} MB this process may use",
        ),
        ("task_timeout_s", s.task_timeout_s, MIN_TASK_TIMEOUT_S, MAX_TASK_TIMEOUT_S, "a day"),
        ("gdal_cachemax_mb", s.gdal_cachemax_mb, 0, s.memory_limit_mb, "memory_limit_mb"),
        ("max_tasks_per_worker", s.max_tasks_per_worker, 0, MAX_TASKS_PER_WORKER, ""),
    ]
    if s.address_space_headroom_mb is not None:
        checks.append(
            (
                "address_space_headroom_mb",
                s.address_space_headroom_mb,
                MIN_MEMORY_MB,
                4 * memory,
                f"4 x the {memory} MB this process may use; unset for 2 x memory_limit_mb",
            )
        )
    for name, value, low, high, why in checks:
        if not isinstance(value, (int, float)) or not (low <= value <= high):
            raise ValueError(
                f"pool setting {name}={value!r} is out of its bounds [{low:g}, {high:g}]"
                + (f" ({why})" if why else "")
            )


@dataclass(frozen=True)
class PoolSettings:
    max_workers: int = 2
    memory_limit_mb: int = 4096
    task_timeout_s: float = 900.0
    start_method: str = "forkserver"
    # 0: keep workers for the pool's life (a Dagster run: one source file; a worker that
    # crashed, timed out or hit its ceiling is always replaced); 1: a fresh process for
    # every task (its cost: benchmarks/isolation.py); N: recycle after N tasks.
    max_tasks_per_worker: int = 0
    gdal_cachemax_mb: int = 256
    # Virtual-memory headroom (RLIMIT_AS) above what a fresh worker maps, as a backstop
    # to the RSS watchdog; None: twice the memory limit.
    address_space_headroom_mb: int | None = None
    env_overrides: dict[str, str] = field(default_factory=dict)
    # Pay PROJ's and Arrow's first-use costs when a worker starts, not in its first task.
    warm_up: bool = True
    # The module whose functions bare task names ("ingest") name, given by the caller (the
    # Dagster resource gives the built-in tasks, defs/resources.py); None: every task names
    # its module, "package.module:function".
    task_module: str | None = None
    # The folder every source a task opens must stay in (None: $GEOISO_DATA_ROOT or ./data).
    data_root: str | None = None
    # GDAL drivers left registered in the workers (see gdal_jail.py). The default is the
    # project's allow-list, so that a pool nobody configured is jailed; None: all drivers.
    allowed_gdal_drivers: frozenset[str] | None = ALLOWED_GDAL_DRIVERS
    # The kernel's sandbox around every task (pool/sandbox.py): "auto" (on where the
    # kernel has it), "on" (refuse to start without it), "off"; by default what
    # GEOISO_POOL_SANDBOX says (a pool from plain asyncio, the benchmarks), else "auto".
    sandbox: str = field(default_factory=lambda: os.environ.get("GEOISO_POOL_SANDBOX") or "auto")

    def __post_init__(self) -> None:
        if self.start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}: {self.start_method!r}")
        check_bounds(self)

    @property
    def env(self) -> dict[str, str]:
        return worker_env(self.gdal_cachemax_mb, self.env_overrides, self.data_root)


def _sandbox_policy(s: PoolSettings) -> sandbox.Policy:
    """What every task of a pool with settings `s` is confined to (SandboxError: "on"
    where the kernel cannot)."""
    root = dataroot.parse_root(s.data_root) if s.data_root else dataroot.root()
    env = {**os.environ, **s.env}
    protected = sandbox.protected_paths(env, str(root.local))
    return sandbox.decide(s.sandbox, root.endpoint(), protected, env)


@dataclass(frozen=True)
class TaskResult:
    """What a task returned, plus how the worker that ran it behaved."""

    facts: dict[str, Any]
    pid: int
    peak_rss_mb: float
    duration_s: float
    tasks_run: int
    # The machine or container the worker ran in (socket.gethostname() there).
    host: str = ""
    # What the task left changed in its worker (environment, working folder, umask, GDAL
    # options) and the worker put back before its next task.
    restored: tuple[str, ...] = ()
    # What the task was confined to ("on: ..."), or why it was not ("off: ...").
    sandbox: str = ""


ProgressCallback = Callable[[dict], None]


def _settle_once(
    future: concurrent.futures.Future, result: Any = None, exception: BaseException | None = None
) -> None:
    """Set a future's outcome unless something else already did (pebble's callback and
    close() may race)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


# How long a worker may take to start (import the geo stack, warm up) before the queue's
# watchdog may take the pool for stalled (WorkerPool._watch).
WORKER_START_GRACE_S = 60.0


class WorkerPool:
    def __init__(self, settings: PoolSettings | None = None) -> None:
        self.settings = settings or PoolSettings()
        self._pool: pebble.ProcessPool | None = None
        self._events: EventListener | None = None
        self._uses_forkserver = False
        self._ids = itertools.count(1)
        self._progress: dict[str, ProgressCallback] = {}
        # Per task with a callback: the numbers of the messages it was given already
        # (a message comes by the event channel, or with the result when that lost it).
        self._delivered: dict[str, set[int]] = {}
        self._delivery = threading.RLock()
        # Futures handed out and not yet settled, so that close() can settle them all.
        self._outstanding: dict[str, tuple[str, concurrent.futures.Future]] = {}
        self._memory_events: dict[int, dict] = {}
        # Tasks a worker said it started (and whether it said it ended), while their
        # futures are outstanding or being cancelled: what cancel() waits for.
        self._started: dict[str, tuple[psutil.Process, bool]] = {}
        self._cancelling: set[str] = set()
        # OOM kills in this cgroup already accounted for (each explains one SIGKILL).
        self._oom_kills_seen = cgroup.oom_kills()
        self._workers: dict[int, psutil.Process] = {}
        self._worker_ticks: dict[int, int] = {}  # when each started (worker.start_ticks)
        self._cond = threading.Condition()
        # The queue's watchdog (`_watch`): when each task not yet taken was submitted (and
        # its pebble future), and when a worker last took or finished a task.
        self._queued: dict[str, tuple[float, concurrent.futures.Future]] = {}
        self._last_progress = time.monotonic()
        self._given_up: dict[str, GeoisoError] = {}  # the watchdog's verdicts, by task
        self._stop_watching = threading.Event()
        self._swap = threading.Lock()  # the pebble pool is replaced, or a task scheduled

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "WorkerPool":
        if self._pool is not None:
            return self
        s = self.settings
        self._events = EventListener(self._on_event)
        me = psutil.Process()
        headroom = s.address_space_headroom_mb
        if headroom is None:
            headroom = 2 * s.memory_limit_mb
        worker_settings = WorkerSettings(
            env=s.env,
            memory_limit_bytes=s.memory_limit_mb * 2**20,
            address_space_limit_bytes=headroom * 2**20 if headroom else None,
            owner_pid=me.pid,
            owner_start_ticks=start_ticks(me.pid),
            events_address=self._events.address,
            task_module=s.task_module,
            allowed_gdal_drivers=s.allowed_gdal_drivers,
            warm_up=s.warm_up,
            reused=s.max_tasks_per_worker != 1,
            sandbox=_sandbox_policy(s),
        )
        if s.start_method == "forkserver":
            context = _forkserver.acquire(s.env, (s.task_module,) if s.task_module else ())
            self._uses_forkserver = True
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
        self._new_pebble = lambda: pebble.ProcessPool(
            max_workers=s.max_workers,
            max_tasks=s.max_tasks_per_worker,
            initializer=initialize,
            initargs=(worker_settings,),
            context=context,
        )
        self._pool = self._new_pebble()
        self._last_progress = time.monotonic()
        self._stop_watching = stop = threading.Event()
        threading.Thread(
            target=self._watch, args=(stop,), name="geoiso-pool-watchdog", daemon=True
        ).start()
        return self

    def close(self) -> None:
        """Kill every worker, running or idle, and wait until they are gone."""
        pool, self._pool = self._pool, None
        self._stop_watching.set()
        if pool is not None:
            pool.stop()
            try:
                pool.join(timeout=10)
            except TimeoutError:
                log.warning("pebble pool did not stop in 10 s; killing its workers")
            _kill_and_reap(list(self._workers.values()))
            self._workers.clear()
            # pebble may stop before it has failed the futures of running tasks: nobody
            # waiting on one may be left hanging.
            for function, outer in list(self._outstanding.values()):
                _settle_once(
                    outer,
                    exception=WorkerCrashedError(
                        f"task {function}: the pool was closed while it ran; its worker was killed"
                    ),
                )
            self._outstanding.clear()
        if self._uses_forkserver:
            self._uses_forkserver = False
            _forkserver.release()
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> "WorkerPool":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "WorkerPool":
        """`async with WorkerPool(...) as pool`: started off the event loop (starting the
        forkserver takes about a second), closed the same way on the way out."""
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    # -- running tasks -----------------------------------------------------------
    def submit(
        self, function: str, *, on_progress: ProgressCallback | None = None, **kwargs: Any
    ) -> "concurrent.futures.Future[TaskResult]":
        """Schedule `function` ("package.module:function", or a built-in task's name:
        task_api.py); the future holds a TaskResult or one of the project's errors
        (BadInputError, WorkerTimeoutError, ...). ValueError for a malformed reference."""
        if not is_qualified(check_task_ref(function)) and self.settings.task_module is None:
            raise ValueError(
                f"task {function!r} names no module, and the pool has no task_module: "
                "name it as 'package.module:function' or give PoolSettings(task_module=...)"
            )
        if self._pool is None:
            self.start()
        assert self._pool is not None
        task_id = f"{os.getpid()}-{next(self._ids)}"
        if on_progress is not None:
            self._progress[task_id] = on_progress
            self._delivered[task_id] = set()
        outer: concurrent.futures.Future[TaskResult] = concurrent.futures.Future()
        # Known before a worker can say it started the task (cancel() waits for those).
        self._outstanding[task_id] = (function, outer)
        with self._swap:
            inner = self._pool.schedule(
                run_task, args=(task_id, function, kwargs), timeout=self.settings.task_timeout_s
            )
        with self._cond:
            self._queued[task_id] = (time.monotonic(), inner)

        def _settle(done: concurrent.futures.Future) -> None:
            self._outstanding.pop(task_id, None)
            ran_on = self._started.get(task_id, (None, True))[0]
            if ran_on is not None and not done.cancelled() and done.exception() is not None:
                # killed by pebble (timeout) or dead (crash): its helpers go with it
                kill_group(ran_on.pid, self._worker_ticks.get(ran_on.pid))
            with self._cond:
                self._queued.pop(task_id, None)
                self._last_progress = time.monotonic()
                verdict = self._given_up.pop(task_id, None)
            if verdict is not None:  # the watchdog gave it up; its pebble pool went with it
                self._progress.pop(task_id, None)
                self._delivered.pop(task_id, None)
                _settle_once(outer, exception=verdict)
                return
            if not done.cancelled():
                with self._cond:
                    self._started.pop(task_id, None)
            if not done.cancelled() and done.exception() is None:
                for event in done.result().get("messages", ()):
                    self._deliver(task_id, event)
            self._progress.pop(task_id, None)
            self._delivered.pop(task_id, None)
            if outer.done():  # cancelled, or settled by close()
                return
            try:
                result = self._result(function, kwargs, done)
            except BaseException as exc:  # noqa: BLE001 - every outcome goes to the caller
                _settle_once(outer, exception=exc)
            else:
                _settle_once(outer, result=result)

        inner.add_done_callback(_settle)
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        return outer

    def cancel(self, futures: "list[concurrent.futures.Future]", wait_s: float = 10.0) -> None:
        """Cancel tasks and return once nothing of them runs any more: each one that had
        started has ended (pebble stopped its worker, or it finished), and each one that
        had not runs nothing when a worker picks it up. A file a cancelled task was
        writing is never written again after this returns, so the caller may remove it.
        A worker still running one of them after `wait_s` is killed here."""
        wanted = {id(future) for future in futures}
        tasks = [t for t, (_, outer) in list(self._outstanding.items()) if id(outer) in wanted]
        events = self._events
        with self._cond:
            self._cancelling.update(tasks)
        try:
            if events is not None:
                for task in tasks:
                    events.mark_cancelled(task)
            for future in futures:
                future.cancel()
            if events is None:
                return
            # Every "started" a worker sent before it could see the marks is handled now.
            events.fence()
            deadline = time.monotonic() + wait_s
            with self._cond:
                while True:
                    running = [
                        process
                        for process, ended in (self._started.get(t, (None, True)) for t in tasks)
                        if not ended and _alive(process)
                    ]
                    if not running or time.monotonic() >= deadline:
                        break
                    self._cond.wait(timeout=0.01)
            _kill_and_reap(running)
        finally:
            with self._cond:
                for task in tasks:
                    self._started.pop(task, None)
                    self._cancelling.discard(task)

    def run(self, function: str, *, on_progress: ProgressCallback | None = None, **kwargs: Any):
        """Run a task and wait for it: TaskResult, or raise the project's error."""
        return self.submit(function, on_progress=on_progress, **kwargs).result()

    async def run_async(
        self, function: str, *, on_progress: ProgressCallback | None = None, **kwargs: Any
    ) -> TaskResult:
        """Awaitable `run`; cancelling the await kills the task's worker."""
        return await asyncio.wrap_future(self.submit(function, on_progress=on_progress, **kwargs))

    # -- outcomes ----------------------------------------------------------------
    def _result(self, function: str, kwargs: dict, done: concurrent.futures.Future) -> TaskResult:
        what = f"task {function}({_describe(kwargs)})"
        try:
            outcome = done.result()
        except concurrent.futures.TimeoutError:
            raise WorkerTimeoutError(
                f"{what} ran past task_timeout_s={self.settings.task_timeout_s:g} s; "
                "its worker was killed"
            ) from None
        except pebble.ProcessExpired as exc:
            raise self._expired(what, exc) from None
        except concurrent.futures.CancelledError:
            raise
        except Exception as exc:  # pebble could not send the task or its result
            raise WorkerCrashedError(f"{what}: worker failed: {exc!r}") from exc
        worker = outcome["worker"]
        if outcome["ok"]:
            return TaskResult(
                facts=outcome["facts"],
                pid=worker["pid"],
                peak_rss_mb=worker["peak_rss_mb"],
                duration_s=worker["duration_s"],
                tasks_run=worker["tasks_run"],
                host=worker["host"],
                restored=tuple(worker.get("restored", ())),
                sandbox=worker.get("sandbox", ""),
            )
        kind, message = outcome["kind"], outcome["message"]
        if kind == "cancelled":
            raise concurrent.futures.CancelledError()
        if kind == "bad_input":
            raise BadInputError(outcome["path"], message)
        if kind == "transient_io":
            raise TransientIOError(f"{what}: {message}")
        if kind == "storage_access":
            raise StorageAccessError(message)
        if kind == "memory":
            raise MemoryLimitError(
                f"{what}: {message}: the address-space backstop stopped an allocation; "
                f"memory_limit_mb={self.settings.memory_limit_mb}"
            )
        raise TaskError(f"{what} failed: {message}", traceback=outcome.get("traceback", ""))

    def _expired(self, what: str, exc: pebble.ProcessExpired) -> GeoisoError:
        code = exc.exitcode
        if code == MEMORY_EXIT_CODE:
            event = self._wait_memory_event(exc.pid)
            limit = self.settings.memory_limit_mb
            peak = f"{event['peak_mb']:g} MB" if event else f"over {limit} MB"
            return MemoryLimitError(
                f"{what}: worker {exc.pid} used {peak} of memory, over its ceiling "
                f"memory_limit_mb={limit}; it was stopped"
            )
        kills = cgroup.oom_kills() if code == -signal.SIGKILL else 0
        if kills > self._oom_kills_seen:
            self._oom_kills_seen = kills
            limit = cgroup.memory_limit_mb()
            return MemoryLimitError(
                f"{what}: worker {exc.pid} was killed by the kernel's OOM killer: its container "
                f"went over its memory limit of {limit} MB (max_workers x memory_limit_mb + "
                "the run process); lower max_workers or memory_limit_mb, or raise the limit"
            )
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return WorkerCrashedError(f"{what}: worker {exc.pid} was killed by {name}")
        return WorkerCrashedError(f"{what}: worker {exc.pid} exited with code {code}")

    def _on_event(self, event: dict) -> None:
        if event.get("type") == "worker_started":
            pid = int(event["pid"])
            try:
                process = psutil.Process(pid)
            except psutil.Error:
                return
            if start_ticks(pid) == event["start_ticks"]:  # that worker, not a reused pid
                self._worker_ticks[pid] = event["start_ticks"]
                with self._cond:
                    self._last_progress = time.monotonic()
                self._workers = {pid: p for pid, p in self._workers.items() if p.is_running()} | {
                    process.pid: process
                }
        elif event.get("type") == "memory_exceeded":
            with self._cond:
                self._memory_events[int(event["pid"])] = event
                self._cond.notify_all()
        elif event.get("type") == "progress":
            self._deliver(str(event.get("task")), event)
        elif event.get("type") == "task_started":
            task = str(event.get("task"))
            try:
                process = psutil.Process(int(event["pid"]))
            except (psutil.Error, KeyError, ValueError):
                return
            with self._cond:
                self._queued.pop(task, None)
                self._last_progress = time.monotonic()
                if task in self._outstanding or task in self._cancelling:
                    self._started[task] = (process, False)
        elif event.get("type") == "task_ended":
            with self._cond:
                task = str(event.get("task"))
                if task in self._started:
                    self._started[task] = (self._started[task][0], True)
                    self._cond.notify_all()

    def _watch(self, stop: threading.Event) -> None:
        """pebble's task timeout starts when a worker takes the task: with every worker
        stopped (SIGSTOP) or hung before taking one, a queued task waited forever. So:
        when tasks have waited a whole task_timeout_s and no worker took or finished one
        in that time (a worker that runs a task ends it within the timeout, or pebble
        kills it: a pool that works cannot go that long without progress), the tasks
        waiting fail with WorkerTimeoutError (transient: the step retries) and the pool's
        workers are replaced (pebble takes a killed idle worker for a broken pool, so the
        whole pebble pool is: stopped, its workers killed, a fresh one started)."""
        timeout = self.settings.task_timeout_s
        while not stop.wait(timeout=min(1.0, timeout / 5)):
            now = time.monotonic()
            if self._starting():
                continue
            with self._cond:
                stalled = now - self._last_progress >= timeout
                late = [t for t, (at, _) in self._queued.items() if now - at >= timeout]
                if not (stalled and late):
                    continue
                self._last_progress = now
                waiting = {t: f for t, (_, f) in self._queued.items()}
                self._queued.clear()
                for task in waiting:
                    function = self._outstanding.get(task, ("task", None))[0]
                    self._given_up[task] = WorkerTimeoutError(
                        f"task {function}: no worker took it within task_timeout_s={timeout:g} "
                        "s of its submission (the pool's workers were stopped or hung before "
                        "taking work); they were replaced"
                    )
            self._replace_workers(f"{len(waiting)} tasks waited {timeout:g} s untaken")
            for inner in waiting.values():
                inner.cancel()  # settles it with its verdict, if stopping pebble did not

    def _starting(self) -> bool:
        """Whether a worker of the pool is still starting (has not said it started, and is
        younger than WORKER_START_GRACE_S): a loaded machine may take longer than a short
        task_timeout_s to start one, and that is no stall."""
        registered = set(self._workers)
        for pid, process in self._pebble_workers().items():
            try:
                young = time.time() - process.create_time() < WORKER_START_GRACE_S
            except psutil.Error:
                continue
            if pid not in registered and young:
                return True
        return False

    def _replace_workers(self, why: str) -> None:
        with self._swap:
            old, workers = self._pool, self._pebble_workers()
            if old is None:
                return
            self._pool = self._new_pebble()
        log.warning("%s: replacing the workers (%s)", why, ", ".join(map(str, workers)))
        _kill_and_reap(list(workers.values()))
        old.stop()
        try:
            old.join(timeout=10)
        except TimeoutError:
            log.warning("the replaced pebble pool did not stop in 10 s")

    def _pebble_workers(self) -> dict[int, psutil.Process]:
        """The pool's worker processes: pebble's own list (it knows workers that never
        reported), else those that said they started."""
        workers = dict(self._workers)
        manager = getattr(getattr(self._pool, "_pool_manager", None), "worker_manager", None)
        for pid in list(getattr(manager, "workers", {}) or {}):
            try:
                workers.setdefault(pid, psutil.Process(pid))
            except psutil.Error:
                pass
        return workers

    def _deliver(self, task_id: str, event: dict) -> None:
        """Hand a progress message to its task's callback, once, whichever way it came."""
        # Called under the lock: when the result's copies are handed over, a message the
        # event thread was handing over at that moment has been, too.
        with self._delivery:
            callback, seen = self._progress.get(task_id), self._delivered.get(task_id)
            if callback is None or seen is None or event.get("seq") in seen:
                return
            seen.add(event.get("seq"))
            callback(event)

    def _wait_memory_event(self, pid: int | None, timeout: float = 1.0) -> dict | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while pid not in self._memory_events and time.monotonic() < deadline:
                self._cond.wait(timeout=0.05)
            return self._memory_events.pop(pid, None) if pid is not None else None


def _describe(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_and_reap(processes: list[psutil.Process]) -> None:
    """Kill workers and what they started (their process groups: worker.kill_group)."""
    alive = [p for p in processes if p.is_running()]
    ticks = {p.pid: start_ticks(p.pid) for p in alive}
    kill_all(alive, wait_s=5)
    for pid, started in ticks.items():
        kill_group(pid, started)
