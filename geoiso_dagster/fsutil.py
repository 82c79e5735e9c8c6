"""The one atomic-write helper: temp file beside the target, fsync, rename. No geo imports.

Readers see the old file or the new one, never half of one. Temp files are dot-files
named after their target and writer, so nothing mistakes them for output and a later
writer can sweep the leftovers of a writer that was killed.
"""

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil

TEMP_MARKER = ".tmp-"
# A temp name is '.' + the target's name + '.tmp-<pid>-<token>', once per writer in the
# chain (run process, worker, fan-out part: three at most). File systems allow 255 bytes
# a name; a long target name is shortened to this many bytes, keeping its start and a hash
# of the whole, so that every temp of every key stays well under the limit.
TEMP_BASE_MAX = 120


def _short(name: str) -> str:
    if len(name.encode()) <= TEMP_BASE_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    head = name.encode()[: TEMP_BASE_MAX - 17].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def temp_path_for(target: Path) -> Path:
    """A temp name beside `target`, for one writer (this process). The temp of a temp
    appends this writer to the chain rather than shortening again, so the sweep still
    knows every writer of it."""
    base = target.name if TEMP_MARKER in target.name else _short(target.name)
    return target.with_name(f".{base}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def _writer_pids(name: str) -> list[int]:
    return [
        int(part.split("-", 1)[0])
        for part in name.split(TEMP_MARKER)[1:]
        if part.split("-", 1)[0].isdigit()
    ]


def sweep_stale_temps(target: Path) -> list[Path]:
    """Remove temp files of `target` (and temps of its temps) that a dead process left.

    A temp name carries the pid of each writer in its chain (run process, then worker);
    if any of them is gone, nobody will finish or rename the file.
    """
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    prefix = f"{_short(target.name)}{TEMP_MARKER}"
    for candidate in target.parent.iterdir():
        if not (candidate.name.startswith(".") and candidate.name.lstrip(".").startswith(prefix)):
            continue
        if all(psutil.pid_exists(pid) for pid in _writer_pids(candidate.name)):
            continue  # every writer still alive: in progress
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)  # an unpacked archive
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `target` durably, on any
    error it is removed and `target` is left exactly as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target)
    tmp = temp_path_for(target)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(staged: Path, target: Path) -> None:
    """Move a finished, checked file onto its final name, durably."""
    os.replace(staged, target)
    _fsync_dir(target.parent)
