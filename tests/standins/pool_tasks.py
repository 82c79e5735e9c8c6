"""Tasks that misbehave on purpose, run by real workers in the pool tests.

The pool runs functions from one module (PoolSettings.task_module); tests point it
here. The real tasks are re-exported so one pool can run both.
"""

import ctypes
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from geoiso_dagster.spatial.tasks import *  # noqa: F403 - the real tasks, too


def sleep(seconds: float) -> dict:
    started = time.time()
    time.sleep(seconds)
    return {"slept": seconds, "pid": os.getpid(), "started": started, "ended": time.time()}


def hang_in_c(seconds: float) -> dict:
    """Block inside a C call with the GIL released, as a stuck GDAL read would."""
    libc = ctypes.CDLL(None)
    libc.sleep(int(seconds))
    return {"pid": os.getpid()}


def allocate(megabytes: int, hold_s: float = 5.0) -> dict:
    """Touch `megabytes` of memory page by page and hold it."""
    block = bytearray(megabytes * 2**20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    time.sleep(hold_s)
    return {"allocated_mb": megabytes}


def abort() -> dict:
    os.abort()


def segfault() -> dict:
    ctypes.string_at(0)
    return {}


def kill_self(signum: int) -> dict:
    os.kill(os.getpid(), signum)
    time.sleep(5)
    return {}


def report_pid() -> dict:
    return {"pid": os.getpid(), "ppid": os.getppid()}


def ignore_sigterm_and_sleep(seconds: float) -> dict:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return {}


def loaded_modules(names: list[str]) -> dict:
    import sys

    return {name: name in sys.modules for name in names}


def allocate_at_once(megabytes: int) -> dict:
    """One allocation far bigger than the ceiling: faster than any RSS poll."""
    block = bytearray(megabytes * 2**20)
    return {"allocated_mb": len(block) // 2**20}


def slow_progress(seconds: float) -> dict:
    from geoiso_dagster.task_api import progress

    progress("started the slow part", step=1)
    time.sleep(seconds)
    return {"done": True}


def leave_state_behind(folder: str) -> dict:
    """What a careless task might do to its process: set a variable and a GDAL option,
    change folder and umask. The worker must undo it before its next task."""
    import pyogrio

    os.environ["GEOISO_LEFT_BEHIND"] = "yes"
    os.environ["GDAL_NUM_THREADS"] = "ALL_CPUS"
    pyogrio.set_gdal_config_options({"OGR_GEOJSON_MAX_OBJ_SIZE": "1", "GDAL_CACHEMAX": "1"})
    os.chdir(folder)
    os.umask(0o000)
    return {"pid": os.getpid()}


def look_at_state() -> dict:
    import pyogrio

    umask = os.umask(0o022)
    os.umask(umask)
    return {
        "pid": os.getpid(),
        "left_behind": os.environ.get("GEOISO_LEFT_BEHIND"),
        "gdal_num_threads_env": os.environ.get("GDAL_NUM_THREADS"),
        "max_obj_size": pyogrio.get_gdal_config_option("OGR_GEOJSON_MAX_OBJ_SIZE"),
        "cachemax": pyogrio.get_gdal_config_option("GDAL_CACHEMAX"),
        "cwd": os.getcwd(),
        "umask": umask,
    }


def counting_progress(total: int, seconds: float) -> dict:
    """Report `total` rows done over `seconds`, as a long step does."""
    from geoiso_dagster.task_api import progress

    for done in range(0, total + 1, max(1, total // 20)):
        progress(f"{done} rows", done=done, total=total, unit="rows")
        time.sleep(seconds / 20)
    return {"done": total}


def read_env(name: str) -> dict:
    """A variable of the worker's environment (None when unset)."""
    return {"value": os.environ.get(name)}


def burst_progress(count: int) -> dict:
    """`count` messages as fast as the worker can send them, then return at once."""
    from geoiso_dagster.task_api import progress

    for i in range(count):
        progress(f"message {i}")
    return {"sent": count}


def sleep_then_write(seconds: float, path: str) -> dict:
    """Say it started (`<path>.started` holds the pid), sleep, then write `path`."""
    with open(f"{path}.started", "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(seconds)
    with open(path, "w") as handle:
        handle.write("written")
    return {"pid": os.getpid()}


def gdal_read_info(path: str) -> dict:
    """GDAL opening `path` with none of the project's checks before it: what the workers'
    driver allow-list and network switches stop on their own (tests/test_jail.py)."""
    import pyogrio

    from geoiso_dagster.spatial import io

    with io.reading(path):
        return {"driver": pyogrio.read_info(path).get("driver")}


def hold_gil(seconds: float) -> dict:
    """Block inside a C call with the GIL held (ctypes.PyDLL does not release it), as a
    long GEOS or PROJ call does: the worker's own watchdog thread cannot run."""
    ctypes.PyDLL(None).sleep(int(seconds))
    return {"pid": os.getpid()}


def start_helper(seconds: float, hang: bool = False) -> dict:
    """Start a helper process (a subprocess, and one it double-forks away) and return
    their pids, or hang in C after starting them (`hang`)."""
    helper = subprocess.Popen(["sleep", str(int(seconds))])
    orphan = subprocess.run(
        ["sh", "-c", f"sleep {int(seconds)} >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    pids = {"helper": helper.pid, "double_forked": int(orphan.stdout), "pid": os.getpid()}
    if hang:
        Path(os.environ["GEOISO_TEST_HELPERS"]).write_text(json.dumps(pids))
        ctypes.CDLL(None).sleep(int(seconds))
    return pids


def return_an_object() -> dict:
    """Facts that are not data: a confined task's outcome crosses as JSON, never pickled."""
    return {"thing": object()}
