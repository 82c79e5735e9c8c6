"""Fault injection for the isolation tests. Off unless GEOISO_FAULTS is set.

GEOISO_FAULTS holds a JSON list of faults, each
    {"task": "reproject", "at": "start" | "write" | POINT, "fault": KIND, "times": 1,
     "state": "/some/dir"}
KIND is one of:
    abort     the interpreter aborts (SIGABRT), as a crash inside GDAL would
    sigkill   the worker is SIGKILLed; at "write", after half of the file is on disk
    hang      the worker blocks inside a C call until killed (writes <state>/hanging-<pid>)
    memory    the worker allocates until its memory ceiling stops it
    linger    the worker ignores SIGTERM for the rest of its life, waits "seconds" (1 s),
              then goes on, as a task slow to notice it was cancelled would
    enospc    the real write runs under RLIMIT_FSIZE=4 KiB and fails (EFBIG)
    enomem    the write fails as Arrow's does when a worker is out of address space
              (OSError ENOMEM, "Memory mapping file failed: Cannot allocate memory")
    swap      the file "from" is renamed over "path" (atomically), as someone swapping
              an inbox file for a link between a check and an open would
    fill      the file "path" grows until its file system is full (ENOSPC), then the
              task goes on: the disk of whatever else lives there (an instance) is full
POINT is a named point inside a task (faults.at_point), e.g. "part" of "upload".
With "armed": a path, a fault fires only while that file exists (a test sets a fault
for a whole deployment and arms it for the one run it is about).
A fault fires on its first `times` occasions, counted across processes with files in
`state`, so "crash once, then succeed" is expressible. Production never sets the variable.
"""

import contextlib
import ctypes
import errno
import json
import os
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

FAULTS_ENV = "GEOISO_FAULTS"
_current_task: str | None = None


def _faults(task: str, at: str) -> list[dict]:
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return []
    return [
        f
        for f in json.loads(raw)
        if f["task"] == task and _at(f) == at and ("armed" not in f or os.path.exists(f["armed"]))
    ]


def _at(fault: dict) -> str:
    return fault.get("at", "start")


def _claim(fault: dict) -> bool:
    """True for the first `times` claims of this fault, across all processes."""
    state = Path(fault["state"])
    state.mkdir(parents=True, exist_ok=True)
    for n in range(int(fault.get("times", 1))):
        try:
            os.close(
                os.open(
                    state / f"fired-{fault['task']}-{_at(fault)}-{fault['fault']}-{n}",
                    os.O_CREAT | os.O_EXCL,
                )
            )
            return True
        except FileExistsError:
            continue
    return False


def _fire(fault: dict, partial: Path | None = None) -> None:
    kind = fault["fault"]
    if kind == "abort":
        os.abort()
    if kind == "sigkill":
        if partial is not None and partial.exists():
            os.truncate(partial, partial.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        (Path(fault["state"]) / f"hanging-{os.getpid()}").touch()
        ctypes.CDLL(None).sleep(3600)
    if kind == "linger":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(float(fault.get("seconds", 1.0)))
        return
    if kind == "fill":
        with open(fault["path"], "ab") as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 2**20)
                filler.flush()
        return
    if kind == "swap":
        os.replace(fault["from"], fault["path"])
        return
    if kind == "enomem":
        raise OSError(errno.ENOMEM, "Memory mapping file failed: Cannot allocate memory")
    if kind == "memory":
        hoard = []
        while True:  # until the watchdog (or RLIMIT_AS) stops us
            block = bytearray(64 * 2**20)
            block[::4096] = b"\1" * len(block[::4096])
            hoard.append(block)
    raise ValueError(f"unknown fault {kind!r} in {FAULTS_ENV}")


def at_start(task: str) -> None:
    """Called first thing by every task."""
    global _current_task
    _current_task = task
    for fault in _faults(task, "start"):
        if fault["fault"] != "enospc" and _claim(fault):
            _fire(fault)


def at_point(task: str, point: str) -> None:
    """Called by a task at a named point of its work (the upload task: "part", after
    each part of a multipart upload)."""
    for fault in _faults(task, point):
        if fault["fault"] != "enospc" and _claim(fault):
            _fire(fault)


@contextlib.contextmanager
def around_write(tmp: Path) -> Iterator[None]:
    """Wraps the write of an output's temp file."""
    faults = [f for f in _faults(_current_task or "", "write") if _claim(f)]
    limited = any(f["fault"] == "enospc" for f in faults)
    if limited:
        saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, saved[1]))
    try:
        yield
    finally:
        if limited:
            resource.setrlimit(resource.RLIMIT_FSIZE, saved)
            signal.signal(signal.SIGXFSZ, previous)
    for fault in faults:
        if fault["fault"] != "enospc":
            _fire(fault, partial=tmp)
