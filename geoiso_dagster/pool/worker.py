"""Code that runs inside a worker process: its set-up, its watchdog, its task runner.

Nothing at module level imports a geo library: the parent imports this module to
name the functions it sends, and the orchestration layer must stay geo-free.
"""

import contextlib
import ctypes
import gc
import importlib
import json
import os
import re
import resource
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil

from geoiso_dagster import dataroot, gdal_jail, task_api
from geoiso_dagster.errors import BadInputError, StorageAccessError, TransientIOError
from geoiso_dagster.fsutil import (
    TASK_FOLDER_ENV,
    TEMP_MARKER,
    host_name,
    host_tag,
    storage_error,
    temp_path_for,
)
from geoiso_dagster.pool import cgroup, sandbox
from geoiso_dagster.pool._events import EventSender, cancel_address
from geoiso_dagster.pool.env import gdal_config_options
from geoiso_dagster.task_api import resolve_task

# Exit code of a worker that the watchdog stopped for going over its memory ceiling.
MEMORY_EXIT_CODE = 86
_WATCH_INTERVAL_S = 0.02
_OWNER_CHECK_EVERY = 10  # watchdog ticks between checks that the pool's owner lives
RELEASE_ABOVE_BASE_BYTES = 64 * 2**20
# How long a task waits for room in the pool's event queue to say it started or ended.
_TELL_POOL_S = 5.0


@dataclass
class WorkerSettings:
    env: dict[str, str]
    memory_limit_bytes: int
    address_space_limit_bytes: int | None
    owner_pid: int
    # When the owner started (start_ticks): with its pid, who it is.
    owner_start_ticks: int
    events_address: str
    task_module: str | None
    allowed_gdal_drivers: frozenset[str] | None = None
    warm_up: bool = True
    reused: bool = False  # the worker runs more than one task: hand memory back between
    # What each task is confined to (pool/sandbox.py); None: the sandbox is off.
    sandbox: "sandbox.Policy | None" = None


class _Baseline:
    """What a task may change in its process and must not hand to the next task: the
    environment, the working folder, the umask, GDAL's configuration options. Taken
    once the worker is set up; put back after every task (microseconds when nothing
    changed), so that a file's settings never reach another file's result."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.cwd = os.getcwd()
        self.umask = os.umask(0)
        os.umask(self.umask)
        self.gdal = gdal_jail.config_options()

    def restore(self) -> list[str]:
        """Undo what the last task changed; return what that was."""
        changed = []
        if os.environ != self.env:
            drift = {
                k for k in set(os.environ) | set(self.env) if os.environ.get(k) != self.env.get(k)
            }
            changed += [f"environment variable {k}" for k in sorted(drift)]
            os.environ.clear()
            os.environ.update(self.env)
        if os.getcwd() != self.cwd:
            changed.append("working folder")
            os.chdir(self.cwd)
        if os.umask(self.umask) != self.umask:
            changed.append("umask")
        return changed + gdal_jail.restore_config_options(self.gdal)


class _WorkerState:
    """Per-process state shared by the task runner and the watchdog thread."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.baseline = _Baseline()
        self.process = psutil.Process()
        # A task that stayed within this much of the fresh worker's memory left little to
        # give back, and handing memory back (a full collection, Arrow's pool, malloc_trim)
        # costs milliseconds: more than a small file's task saves by it.
        self.release_above = self.process.memory_info().rss + RELEASE_ABOVE_BASE_BYTES
        self.events = EventSender(settings.events_address)
        self.task_peak_rss = 0
        self.current_task: str | None = None
        self.tasks_run = 0
        # The current task's progress messages, numbered, sent again with its result: a
        # datagram may lose the race with the result, or find the pool's queue full.
        self.messages: list[dict] = []
        self.lock = threading.Lock()
        # The process a confined task runs in, while it runs: what the watchdog measures.
        self.child: psutil.Process | None = None
        self.memory_stop = False  # the watchdog stopped the task for its memory
        self.exiting: set[int] = set()  # task processes that told their outcome, ending
        self.protected = sandbox.protected_paths(dict(os.environ), str(dataroot.root().local))

    def begin_task(self, task_id: str) -> None:
        with self.lock:
            self.current_task = task_id
            self.messages = []
            self.task_peak_rss = self.process.memory_info().rss

    def end_task(self) -> int:
        with self.lock:
            self.current_task = None
            self.tasks_run += 1
            return max(self.task_peak_rss, self.process.memory_info().rss)


_state: _WorkerState | None = None


def initialize(settings: WorkerSettings) -> None:
    """Pool initializer: environment, GDAL/PROJ config, limits, watchdog."""
    global _state
    # The pool kills a worker only when it must (timeout, teardown): die at once,
    # even inside a C call, instead of pebble's graceful SystemExit.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    hold_descendants()
    cgroup.volunteer_for_oom_killer()
    os.environ.update(settings.env)
    _apply_geo_config(settings.env)
    if settings.allowed_gdal_drivers is not None:
        gdal_jail.restrict_drivers(settings.allowed_gdal_drivers)
    if settings.warm_up:
        _warm_up()
    if settings.sandbox is not None and settings.sandbox.on:
        sandbox.prepare(settings.sandbox)
        host_tag()  # cached now: a confined task cannot read what it is made of
    if settings.address_space_limit_bytes:
        # Backstop for a spike faster than the watchdog's poll: allocation fails with
        # MemoryError instead of the machine swapping or the OOM killer choosing. Set
        # after the warm-up, whose thread stacks and allocator arenas are address space.
        limit = psutil.Process().memory_info().vms + settings.address_space_limit_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _state = _WorkerState(settings)
    task_api.connect(_report)
    # Tell the pool who we are, so its teardown can kill us even if pebble lost track.
    _state.events.send(
        {"type": "worker_started", "pid": os.getpid(), "start_ticks": start_ticks(os.getpid())}
    )
    threading.Thread(target=_watchdog, args=(_state,), name="geoiso-watchdog", daemon=True).start()
    # Everything alive now (the preloaded geo stack) lives as long as the worker: keep it
    # out of the collector's scans (a full collection then takes 0.02 ms, not 25 ms).
    gc.freeze()


_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def hold_descendants() -> None:
    """What a worker starts ends with it, and it ends with its parent:
    - the kernel SIGKILLs it when its parent (the forkserver, or the run process under
      spawn) dies, even inside a long C call that holds the GIL, or stopped (SIGSTOP),
      where its own watchdog thread could not run;
    - it leads its own process group, so the pool can kill its helpers with it
      (`kill_group`), and is their subreaper, so a helper that double-forks stays
      below it rather than going to init."""
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the kernel was told
        os._exit(0)
    _let_go_of_the_forkserver()
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # a session leader already (never, forked by the forkserver)


def _let_go_of_the_forkserver() -> None:
    """multiprocessing gives each child of the forkserver the write end of the pipe the
    forkserver watches for its owner's death, so that the forkserver outlives its
    children: with it, a run process's death reached neither (the forkserver waited for
    the workers, which waited for the forkserver). A worker never forks through it, so it
    closes that end: the forkserver then exits with the run process, and the kernel kills
    the workers with it (PR_SET_PDEATHSIG)."""
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver
        fd = getattr(server, "_forkserver_alive_fd", None)
        if fd is not None:
            os.close(fd)
            server._forkserver_alive_fd = None
    except (ImportError, AttributeError, OSError):
        pass


def kill_helpers(spare: set[int] | frozenset[int] = frozenset()) -> int:
    """Kill every process this worker started that still runs (a task's helpers; the
    multiprocessing resource tracker excepted, which ends with its own pipe, and `spare`:
    task processes that told their outcome and are ending); returns how many."""
    if not _has_children():
        return 0
    helpers = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in spare:
                continue
            if "resource_tracker" not in " ".join(child.cmdline()):
                helpers.append(child)
        except psutil.Error:
            continue
    kill_all(helpers, wait_s=2)
    return len(helpers)


def kill_all(processes: list[psutil.Process], wait_s: float) -> None:
    """SIGKILL each of `processes` (gone already: fine) and wait up to `wait_s` for them."""
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=wait_s)


def _has_children() -> bool:
    """Cheaply (the kernel's per-thread child lists; psutil scans all of /proc)."""
    try:
        return any(p.read_text().strip() for p in Path("/proc/self/task").glob("*/children"))
    except OSError:
        return True


def kill_group(leader: int, leader_ticks: int | None = None) -> int:
    """From the pool, once worker `leader` is dead or killed: kill what is left of its
    process group (its helpers), never a process that started before the worker did (a
    pid reused as a group id). Returns how many."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == leader:
            continue
        try:
            stat = (entry / "stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[2]) != leader or (leader_ticks and int(fields[19]) < leader_ticks):
                continue
            os.kill(int(entry.name), signal.SIGKILL)
            killed += 1
        except (OSError, ValueError):
            continue
    return killed


def _warm_up() -> None:
    """Pay the first-use costs of PROJ and Arrow now, while this worker waits for its
    first task (about 70 ms, measured: PROJ opening proj.db and its first operation
    search, Arrow's first Parquet read), instead of inside that task. Pebble starts a
    replacement worker as soon as one exits, so with two or more workers the next task
    usually finds one already warm. It must happen here, after the fork: an open SQLite
    handle and Arrow's thread pools must not cross a fork."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyproj

    pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(0.0, 0.0)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"x": [0]}), buffer)
    pq.read_table(pa.BufferReader(buffer.getvalue()))


def _apply_geo_config(env: dict[str, str]) -> None:
    import pyogrio
    import pyproj.network

    options = gdal_config_options(env)
    pyogrio.set_gdal_config_options(options)
    pyproj.network.set_network_enabled(env.get("PROJ_NETWORK", "OFF").upper() == "ON")
    try:
        from osgeo import gdal
    except ImportError:
        return  # the osgeo bindings are optional: pyogrio does the I/O
    gdal.UseExceptions()
    for key, value in options.items():
        gdal.SetConfigOption(key, value)


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (field 22 of /proc/<pid>/stat),
    or None when there is no such process. With the pid, it names one process: a reused
    pid has another start. psutil's create_time() is not used for this: it adds the boot
    time as the wall clock gives it, which one process caches and another reads afresh,
    so a step of the wall clock (NTP, a virtual machine restored or forked) between the
    two makes a live owner look dead, and every worker left at once."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def owner_alive(pid: int, ticks: int) -> bool:
    """Whether the process that started at `ticks` as `pid` still runs."""
    return start_ticks(pid) == ticks


def _watchdog(state: _WorkerState) -> None:
    """Enforce the memory ceiling on this process and die with the pool's owner."""
    limit = state.settings.memory_limit_bytes
    tick = 0
    while True:
        try:
            rss = (state.child or state.process).memory_info().rss
        except psutil.Error:  # the task's process just ended
            rss = state.process.memory_info().rss
        with state.lock:
            state.task_peak_rss = max(state.task_peak_rss, rss)
            task = state.current_task
        if rss > limit:
            state.memory_stop = True
            state.events.send(
                {
                    "type": "memory_exceeded",
                    "pid": os.getpid(),
                    "task": task,
                    "peak_mb": round(rss / 2**20, 1),
                    "limit_mb": round(limit / 2**20, 1),
                }
            )
            kill_helpers()
            os._exit(MEMORY_EXIT_CODE)
        tick += 1
        owner = (state.settings.owner_pid, state.settings.owner_start_ticks)
        if tick % _OWNER_CHECK_EVERY == 0 and not owner_alive(*owner):
            # The run process is gone (killed, crashed): nobody will read our result.
            kill_helpers()
            os._exit(0)
        time.sleep(_WATCH_INTERVAL_S)


def _release_memory() -> None:
    """Give back what the last task freed, so that the next one starts from a small
    worker (its ceiling counts resident memory): Python's cycles, Arrow's pool, and
    the glibc heap's free pages."""
    gc.collect()
    try:
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    except ImportError:  # a task module without Arrow
        pass
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# Messages of one task kept for its result; past this many, only those without counts
# (the notes a person reads; the counts only feed the status line) are kept.
MAX_KEPT_MESSAGES = 1000


def _report(message: str, facts: dict) -> None:
    """task_api.progress in a worker: the pool forwards the message to its listener, at
    once and, for any the channel lost, with the task's result: every message a task
    sends before it returns reaches the caller before the task's future settles."""
    state = _state
    if state is None:
        return
    event = {
        "type": "progress",
        "pid": os.getpid(),
        "task": state.current_task,
        "seq": len(state.messages),
        "message": message,
    } | {k: v for k, v in facts.items() if isinstance(v, (int, float, str, bool))}
    state.messages.append(event)
    if len(state.messages) > MAX_KEPT_MESSAGES and "done" in state.messages[-2]:
        state.messages[-2] = {"seq": state.messages[-2]["seq"]}  # delivered or superseded
    state.events.send(event)


def _os_error_outcome(exc: OSError) -> dict:
    """An OSError no task classified: Arrow's S3 filesystem failing mid-read of an object
    read in place is transient (its text names bucket, key and AWS's error kind, never a
    credential); anything else is a bug, as any exception no one classified."""
    if "AWS Error" in str(exc):
        return {"ok": False, "kind": "transient_io", "message": " ".join(str(exc).split())}
    return {
        "ok": False,
        "kind": "error",
        "message": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(),
    }


class _Cancelled(Exception):
    """The pool cancelled the task before this worker picked it up."""


def run_task(task_id: str, function: str, kwargs: dict) -> dict:
    """Run `function` (see resolve_task) and wrap what happened in an outcome dict: in a
    confined child of this worker when the sandbox is on (`_run_confined`), else here.

    Exceptions become data here, not pickled objects: the parent rebuilds the right
    error type from `kind`, whatever the worker's exception classes look like.
    """
    state = _state
    if state is None:
        raise RuntimeError("worker used before initialize()")
    state.begin_task(task_id)
    started = time.perf_counter()
    outcome: dict
    # Told before anything else (and waited for, if the pool's queue is full), so that a
    # pool cancelling this task knows to wait for this process; then, if it was cancelled
    # before it got here, nothing of it runs (pool.WorkerPool.cancel).
    state.events.send(
        {"type": "task_started", "task": task_id, "pid": os.getpid()}, wait_s=_TELL_POOL_S
    )
    policy = state.settings.sandbox
    if state.events.bound(cancel_address(state.settings.events_address, task_id)):
        outcome = {"ok": False, "kind": "cancelled", "message": "cancelled before it started"}
    elif policy is not None and policy.on:
        outcome = _run_confined(state, policy, function, kwargs)
    else:
        outcome = _outcome(state, function, kwargs)
        outcome["messages"] = [m for m in state.messages if "message" in m]
    state.events.send({"type": "task_ended", "task": task_id}, wait_s=_TELL_POOL_S)
    peak = state.end_task()
    restored = state.baseline.restore()
    if helpers := kill_helpers(spare=state.exiting):  # what a task starts ends with it
        restored = [*restored, f"{helpers} helper processes it left running (killed)"]
    if state.settings.reused and peak > state.release_above:
        _release_memory()
    outcome["worker"] = {
        "restored": restored,
        "pid": os.getpid(),
        "host": host_name(),
        "peak_rss_mb": round(peak / 2**20, 1),
        "duration_s": round(time.perf_counter() - started, 4),
        "tasks_run": state.tasks_run,
        "sandbox": policy.summary if policy is not None else "off: not configured",
    }
    return outcome


def _outcome(state: _WorkerState, function: str, kwargs: dict) -> dict:
    """Run the task here: its facts, or what went wrong, as data."""
    try:
        fn = resolve_task(function, state.settings.task_module)
        facts = fn(**kwargs)
        if not isinstance(facts, dict):
            raise TypeError(f"{function} returned {type(facts).__name__}, not a dict of facts")
        return {"ok": True, "facts": facts}
    except BadInputError as exc:
        return {"ok": False, "kind": "bad_input", "path": exc.path, "message": exc.cause}
    except TransientIOError as exc:
        return {"ok": False, "kind": "transient_io", "message": str(exc)}
    except StorageAccessError as exc:
        return {"ok": False, "kind": "storage_access", "message": str(exc)}
    except OSError as exc:
        return _os_error_outcome(exc)
    except MemoryError as exc:
        detail = f": {exc}" if str(exc) else ""
        return {"ok": False, "kind": "memory", "message": f"allocation failed{detail}"}
    except Exception as exc:
        return {
            "ok": False,
            "kind": "error",
            "message": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }


# The longest line a confined task may send its worker (a progress message, its outcome).
MAX_CHILD_LINE = 64 * 2**20
_STORAGE_KINDS = {StorageAccessError: "storage_access", TransientIOError: "transient_io"}
_KINDS = {"bad_input", "transient_io", "storage_access", "memory", "error", "cancelled"}
# Arguments that name what a task writes: it writes them in its private folder instead.
_OUTPUT_ARGUMENTS = ("output", "scratch")


def _run_confined(state: _WorkerState, policy: "sandbox.Policy", function: str, kwargs: dict):
    """Run the task in a child of this worker that confines itself first (pool/sandbox.py)
    to what this task needs, and tells its progress and outcome as JSON lines on a pipe.
    Its output is written in a private folder and moved to its name here when it
    succeeded. A child killed by a signal kills this worker by the same signal, so the
    pool judges a crash, a memory stop or an OOM kill as it always has."""
    _reap(state)
    with contextlib.suppress(Exception):  # import the task's module before the fork
        resolve_task(function, state.settings.task_module)
    try:
        folder, call, moves, returns = _private_folder(kwargs)
    except OSError as exc:
        doing = "making the task's private folder"
        error = storage_error(Path(str(kwargs.get("output") or kwargs.get("path"))), exc, doing)
        return {"ok": False, "kind": _STORAGE_KINDS[type(error)], "message": str(error)}
    reads = [*sandbox.task_reads(kwargs), *_module_folder(function, state, policy)]
    writes = _mirror_folder(kwargs)
    seen = {path: _identity(path) for path in reads}
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        _child(state, policy, function, call, reads, writes, str(folder), writer)
    os.close(writer)
    try:
        state.child = psutil.Process(pid)
    except psutil.Error:
        state.child = None
    try:
        outcome = _listen(state, reader)
        # A process that told its outcome is ending (its memory being unmapped, ms at a
        # warm worker's size): reaped before the next task, not waited for now.
        done, status = os.waitpid(pid, os.WNOHANG if outcome is not None else 0)
        if not done:
            state.exiting.add(pid)
    finally:
        state.child = None
    try:
        if done and os.WIFSIGNALED(status):
            _die_like(os.WTERMSIG(status), state)
        if outcome is not None:
            _learn_imports(outcome.pop("imported", None), state)
        if outcome is None:
            code = os.waitstatus_to_exitcode(status) if done else "?"
            outcome = {
                "ok": False,
                "kind": "error",
                "message": f"the task's confined process ended (code {code}) with no outcome",
            }
        if not outcome.get("ok") and outcome.get("kind") != "cancelled":
            replaced = sorted(p for p in seen if _identity(p) != seen[p])
            if replaced:  # its grant is the file it was given, not what the name is now
                outcome = {
                    "ok": False,
                    "kind": "transient_io",
                    "message": f"{replaced[0]} was replaced while the task read it "
                    f"({outcome.get('message', '')}); read again",
                }
        if outcome.get("ok"):
            for private, final in moves:
                if private.exists() or private.is_symlink():
                    os.replace(private, final)
            for private, staged in returns:  # a staged file the task rewrote (describe)
                if _regular(private) and not os.path.samefile(private, staged):
                    os.replace(private, staged)
            names = {str(private): str(final) for private, final in [*moves, *returns]}
            outcome["facts"] = _renamed(outcome["facts"], names)
        return outcome
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Modules a confined task imported that its worker imports before the next fork, so that
# the next task's process has them loaded: by top-level package, the geo stack's and the
# standard library's (never one whose import does something: a browser, a window).
MAX_LEARNED_IMPORTS = 2000
_LEARNABLE = frozenset(
    {
        "geoiso_dagster",
        "pyarrow",
        "pandas",
        "geopandas",
        "shapely",
        "pyproj",
        "pyogrio",
        "numpy",
        "osgeo",
        "ijson",
        "flatbuffers",
        "boto3",
        "botocore",
        "s3transfer",
        "urllib3",
        "dateutil",
        "jmespath",
        "pytz",
        "tzdata",
    }
)
_NEVER_LEARNED = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"})
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _learn_imports(names, state: _WorkerState) -> None:
    """Import here what the last task's process imported (a confined task's process ends
    with its task, and with it what it loaded: measured, a 10k chain's tasks paid 50 ms
    each for it). Its word is only a list of names, checked against _LEARNABLE."""
    if not isinstance(names, list):
        return
    own = (state.settings.task_module or "").partition(".")[0]
    for name in names:
        if not isinstance(name, str) or name in sys.modules or not _MODULE_NAME.match(name):
            continue
        top = name.partition(".")[0]
        learnable = top in _LEARNABLE or top == own or top in sys.stdlib_module_names
        if learnable and top not in _NEVER_LEARNED and not top.startswith("_"):
            with contextlib.suppress(Exception):
                importlib.import_module(name)


def _renamed(value, names: dict[str, str]):
    """`value` (a task's facts) with each private path it names put as the caller named it."""
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, dict):
        return {k: _renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return value


def _reap(state: _WorkerState) -> None:
    """Reap the task processes that have ended since (one still ending is waited for:
    they end in milliseconds, and none may be left over a task)."""
    for pid in sorted(state.exiting):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        state.exiting.discard(pid)


def _private_folder(kwargs: dict) -> tuple[Path, dict, list[tuple[Path, Path]], list]:
    """(the task's private folder, its arguments naming files there instead of where the
    orchestrator wants them, (private, wanted) outputs to move when it succeeded, (private,
    staged) links to the staged file it reads, moved over it when the task rewrote it).
    The folder is a temp of this worker (swept if the worker dies) beside the first
    output, else beside the staged file it is given as `path` (a read-back or a
    `describe`, which may rewrite it: the task gets a hard link to it in the folder),
    else beside the first file of the
    data root it reads (a private copy or link of it stays on its file system), else
    beside a transfer's copy in a bucket root's mirror, else in the temp folder."""
    outputs = [
        (name, Path(kwargs[name]))
        for name in _OUTPUT_ARGUMENTS
        if isinstance(kwargs.get(name), str) and os.path.isabs(kwargs[name])
    ]
    staged = kwargs.get("path")
    staged = Path(staged) if isinstance(staged, str) and os.path.isabs(staged) else None
    if staged is not None and not (TEMP_MARKER in staged.name and _regular(staged)):
        staged = None
    local = dataroot.root().local
    inside = [
        Path(value)
        for value in kwargs.values()
        if isinstance(value, str) and os.path.isabs(value) and Path(value).is_relative_to(local)
    ]
    relative = kwargs.get("relative")
    mirror = dataroot.root().transfer_folder(relative) if isinstance(relative, str) else None
    beside = outputs[0][1] if outputs else staged or (inside[0] if inside else None)
    if beside is None and mirror is not None:  # a transfer's temps: on the mirror's disk
        beside = mirror / Path(relative).name
    if beside is not None:
        folder = temp_path_for(beside)
        folder.mkdir(mode=0o700, parents=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="geoiso-task-"))
    call = dict(kwargs)
    moves = []
    for name, wanted in outputs:
        call[name] = str(folder / wanted.name)
        if name == "output":
            moves.append((folder / wanted.name, wanted))
    returns = []
    if staged is not None and staged.parent == folder.parent:
        os.link(staged, folder / staged.name)  # the staged file stays where it is meanwhile
        call["path"] = str(folder / staged.name)
        returns.append((folder / staged.name, staged))
    return folder, call, moves, returns


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _mirror_folder(kwargs: dict) -> list[str]:
    """The mirror's folder a transfer task of a bucket root (`relative`: fetch, upload,
    read back) keeps its copy in (docs/security.md: the folder, not the file)."""
    relative = kwargs.get("relative")
    folder = dataroot.root().transfer_folder(relative) if isinstance(relative, str) else None
    return [str(folder)] if folder is not None else []


def _module_folder(function: str, state: _WorkerState, policy: "sandbox.Policy") -> list[str]:
    """The folder of a task's module, when it is not in the environment already (a team's
    own steps): its lazy imports read there."""
    module = function.rpartition(":")[0] or state.settings.task_module
    loaded = getattr(sys.modules.get(module or ""), "__file__", None)
    if not loaded:
        return []
    return list(sandbox.readable([str(Path(loaded).parent)], state.protected))


def _child(state, policy, function, call, reads, writes, folder: str, out: int) -> None:
    """The task's process: confine, check, run, tell, exit (it never returns)."""
    code = 0
    before = set(sys.modules)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        sandbox.close_inherited(keep={out})
        state.events = _PipeSender(out)
        state.lock = threading.Lock()
        os.environ["TMPDIR"] = os.environ["CPL_TMPDIR"] = os.environ[TASK_FOLDER_ENV] = folder
        tempfile.tempdir = folder
        with contextlib.suppress(Exception):
            import pyogrio

            pyogrio.set_gdal_config_options({"CPL_TMPDIR": folder})
        fault_reads, fault_writes = sandbox.fault_grants(dict(os.environ))
        sandbox.confine(policy, [*reads, *fault_reads], folder, (*writes, *fault_writes))
        weak = sandbox.weaknesses(policy, os.getppid())
        if weak:
            raise sandbox.SandboxError(
                "this worker's sandbox is weaker than configured (" + "; ".join(weak) + ")"
            )
        outcome = _outcome(state, function, call)
    except sandbox.SandboxError as exc:
        outcome = {"ok": False, "kind": "error", "message": f"sandbox: {exc}"}
    except BaseException as exc:  # noqa: BLE001 - told, whatever it is
        outcome = {"ok": False, "kind": "error", "message": f"{type(exc).__name__}: {exc}"}
    outcome["messages"] = [m for m in state.messages if "message" in m]
    outcome["imported"] = sorted(set(sys.modules) - before)[:MAX_LEARNED_IMPORTS]
    try:
        _write_line(out, {"outcome": outcome})
    except Exception as exc:  # facts that are not data
        code = 3
        with contextlib.suppress(Exception):
            _write_line(
                out,
                {
                    "outcome": {
                        "ok": False,
                        "kind": "error",
                        "message": f"{function} returned facts that are not plain data: {exc}",
                    }
                },
            )
    with contextlib.suppress(OSError):
        os.close(out)  # the worker reads the end now, not once this process is gone
    os._exit(code)


def _plain(value):
    """JSON for the numbers and paths a task's facts may hold (numpy's, pathlib's)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not data")


def _write_line(fd: int, item: dict) -> None:
    data = json.dumps(item, default=_plain).encode() + b"\n"
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _PipeSender:
    """The child's end of the event channel: each event a JSON line to its worker."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, event: dict, wait_s: float = 0.0) -> bool:
        try:
            _write_line(self._fd, {"event": event})
            return True
        except (OSError, TypeError, ValueError):
            return False

    def bound(self, address: str) -> bool:
        return False

    def close(self) -> None:
        pass


def _listen(state: _WorkerState, fd: int) -> dict | None:
    """Forward the child's progress to the pool (as this worker's) until it closes its
    end; its outcome, if it told one that has the shape of one."""
    outcome = None
    with os.fdopen(fd, "rb") as stream:
        for line in iter(lambda: stream.readline(MAX_CHILD_LINE), b""):
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if not isinstance(item, dict):
                continue
            event = item.get("event")
            if isinstance(event, dict) and event.get("type") == "progress":
                event.update(pid=os.getpid(), task=state.current_task)
                state.events.send(event)
            elif "outcome" in item:
                outcome = _checked(item["outcome"])
    return outcome


def _checked(outcome) -> dict | None:
    """`outcome` if it has the shape the pool reads (a confined task's word is data)."""
    if not isinstance(outcome, dict) or not isinstance(outcome.get("ok"), bool):
        return None
    if not isinstance(outcome.get("messages", []), list):
        return None
    if outcome["ok"]:
        return outcome if isinstance(outcome.get("facts"), dict) else None
    if outcome.get("kind") not in _KINDS or not isinstance(outcome.get("message"), str):
        return None
    if outcome["kind"] == "bad_input" and not isinstance(outcome.get("path"), str):
        return None
    return outcome


def _die_like(signum: int, state: _WorkerState) -> None:
    """The task's process was killed by `signum`: end this worker the same way (after the
    watchdog, when it was the one that stopped it for its memory)."""
    if state.memory_stop:
        time.sleep(5)  # the watchdog exits with MEMORY_EXIT_CODE meanwhile
    kill_helpers()
    if signum not in (signal.SIGKILL, signal.SIGSTOP):  # which have no handler to reset
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1)
    os._exit(128 + signum)
