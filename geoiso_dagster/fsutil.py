"""The one atomic-write helper: temp file beside the target, fsync, rename. No geo imports.

Readers see the old file or the new one, never half of one. Temp files are dot-files
named after their target and writer, so nothing mistakes them for output and a later
writer can sweep the leftovers of a writer that was killed.

Many hosts (or run containers) may share one data root. A writer is named by its pid
*and* its host, so a sweep judges a writer by its pid only on the writer's own host; a
temp written on another host is left alone while it is fresh, and swept once nobody has
written it for the lease (GEOISO_TEMP_LEASE_S): a dead host or container never comes
back to finish it, and a live writer on another host is never judged by a pid that
means nothing here.
"""

import contextlib
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from geoiso_dagster.errors import BadInputError, StorageAccessError, TransientIOError

TEMP_MARKER = ".tmp-"
# A temp name is '.' + the target's name + '.tmp-<pid>@<host tag>-<token>', once per
# writer in the chain (run process, worker, fan-out part: three at most). File systems
# allow 255 bytes a name; a long target name is shortened to this many bytes, keeping its
# start and a hash of the whole, so that every temp of every key stays under the limit
# (3 writers x at most 43 bytes + 1 + 120 = 250).
TEMP_BASE_MAX = 120
LEASE_ENV = "GEOISO_TEMP_LEASE_S"
# A temp of another host is presumed dead after this long without a write. Far longer
# than any pause of a live writer here (a fan-out part waits for its siblings for
# minutes at most), far shorter than leaving a dead container's gigabytes for good.
DEFAULT_LEASE_S = 3600.0
_WRITER = re.compile(r"(\d+)(?:@([A-Za-z0-9.]+))?-")


def host_name() -> str:
    """The machine or container this process runs in, as the catalog shows it."""
    return socket.gethostname()


@functools.cache
def host_tag() -> str:
    """This host's identity in temp names: its name (at most 12 characters, letters and
    digits) and a hash that also covers the boot and the pid namespace, so two
    containers that share a host name (or a host and its containers) never pass for one
    another and judge each other's pids."""
    name = host_name()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = "", 0
    digest = hashlib.sha256(f"{name}|{boot}|{namespace}".encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9]', '', name)[:12] or 'host'}.{digest}"


def lease_seconds() -> float:
    value = os.environ.get(LEASE_ENV)
    return float(value) if value else DEFAULT_LEASE_S


def short_name(name: str) -> str:
    if len(name.encode()) <= TEMP_BASE_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    head = name.encode()[: TEMP_BASE_MAX - 17].decode("utf-8", "ignore")
    return f"{head}~{digest}"


# Set in a confined task's process (pool/worker.py): the one folder it may write, where
# its temps go whatever they are the temps of.
TASK_FOLDER_ENV = "GEOISO_TASK_FOLDER"


def temp_path_for(target: Path) -> Path:
    """A temp name beside `target`, for one writer (this process); in a confined task,
    in its folder. The temp of a temp appends this writer to the chain rather than
    shortening again, so the sweep still knows every writer of it."""
    base = target.name if TEMP_MARKER in target.name else short_name(target.name)
    writer = f"{os.getpid()}@{host_tag()}"
    temp = target.with_name(f".{base}{TEMP_MARKER}{writer}-{secrets.token_hex(4)}")
    folder = os.environ.get(TASK_FOLDER_ENV)
    if folder and not target.parent == Path(folder):
        return Path(folder) / temp.name
    return temp


def _writers(name: str) -> list[tuple[int, str | None]]:
    """(pid, host tag) of each writer in a temp name's chain; the tag is None in names
    written before temps carried one (they were all of one host)."""
    found = []
    for part in name.split(TEMP_MARKER)[1:]:
        match = _WRITER.match(part)
        if match:
            found.append((int(match.group(1)), match.group(2)))
    return found


def _idle_seconds(path: Path) -> float:
    """How long since anything wrote `path` (or, for an unpacked archive, any file in
    it)."""
    try:
        latest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for inner in path.rglob("*"):
                latest = max(latest, inner.lstat().st_mtime)
    except OSError:
        return 0.0
    return time.time() - latest


def abandoned_name(name: str, idle_seconds) -> bool:
    """True when no writer will finish or rename the temp named `name`: a writer of this
    host is gone, or a writer of another host let the lease run out. `idle_seconds`: how
    long nothing wrote it (a number, or a function giving it, asked only when needed)."""
    here = host_tag()
    writers = _writers(name)
    if any(tag in (None, here) and not _pid_alive(pid) for pid, tag in writers):
        return True
    if any(tag not in (None, here) for _, tag in writers):
        idle = idle_seconds() if callable(idle_seconds) else idle_seconds
        return idle > lease_seconds()
    return False


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host lives; True when this process may not tell (a
    confined task sees no other process: psutil then lists /proc, which it may not read)."""
    try:
        return psutil.pid_exists(pid)
    except OSError:
        return True


def _abandoned(candidate: Path) -> bool:
    return abandoned_name(candidate.name, lambda: _idle_seconds(candidate))


def sweep_stale_temps(target: Path) -> list[Path]:
    """Remove temp files of `target` (and temps of its temps) that a dead writer left.

    A temp name carries the pid and host of each writer in its chain (run process, then
    worker); if one of this host's writers is gone, or the file of another host's writer
    has not been written for the lease, nobody will finish or rename it.
    """
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    prefix = f"{short_name(target.name)}{TEMP_MARKER}"
    for candidate in target.parent.iterdir():
        if not (candidate.name.startswith(".") and candidate.name.lstrip(".").startswith(prefix)):
            continue
        if not _abandoned(candidate):
            continue  # a writer is still at it
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)  # an unpacked archive
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def remove_attempt(staged: Path, keep_staged: bool = False) -> list[Path]:
    """Remove what one attempt at an output wrote: its staged file (`staged`, a temp name
    of this writer with its own token) and every temp made from it (fan-out parts, the
    workers' temps of those), whoever their writers were and whether or not they live.
    Call it once nothing of the attempt runs any more (WorkerPool.cancel); `keep_staged`
    leaves the staged file itself (removed with its object by the data root's discard)."""
    removed: list[Path] = []
    if not staged.parent.is_dir():
        return removed
    stem = staged.name.lstrip(".")
    for candidate in staged.parent.iterdir():
        name = candidate.name.lstrip(".")
        if not name.startswith(stem) or not (
            name == stem or name[len(stem) :].startswith(TEMP_MARKER)
        ):
            continue
        if keep_staged and candidate.name == staged.name:
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)  # an unpacked archive
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


# OS errors that can pass on their own (a full disk, an NFS hiccup): retried.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EINTR,
        errno.ENOMEM,
        errno.EFBIG,  # a file-size limit (RLIMIT_FSIZE, quota) is the environment's
    }
)
# OS errors of the storage refusing, whatever is read or written: never the input's.
REFUSING_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def storage_error(path: Path, exc: OSError, doing: str) -> "StorageAccessError | TransientIOError":
    """An OS error of the data root's storage, named by its folder and the OS error: a
    transient one (retried), or the folder refusing (read-only, unwritable, removed)."""
    code = exc.errno
    name = errno.errorcode.get(code, "?") if code is not None else "?"
    reason = f"{exc.strerror or ' '.join(str(exc).split())} ({name})"
    folder = path.parent
    if code in TRANSIENT_ERRNOS:
        return TransientIOError(f"{folder}: {doing} {path.name} failed: {reason}")
    if code == errno.ENOENT and not folder.exists():
        reason += "; the folder was removed while the run wrote into it"
    return StorageAccessError(
        f"{folder}: {doing} {path.name} failed: {reason}; the data root's storage refused it "
        "(the input is not at fault)"
    )


def make_dirs(folder: Path) -> None:
    """`folder` and its missing parents, each new one's entry made durable (an fsync of
    the folder that holds it): a power cut must not lose the folder of a file published
    and recorded in it."""
    missing = []
    at = folder
    while not at.exists():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for each in reversed(missing):
        try:
            each.mkdir(exist_ok=True)
            _fsync_dir(each.parent)
        except OSError as exc:
            raise storage_error(each, exc, "making the folder") from None


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
    make_dirs(target.parent)
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
    try:
        os.replace(staged, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise storage_error(target, exc, "publishing") from None


def read_small_regular_file(path: Path, inside: Path | None, limit: int) -> bytes:
    """The bytes of `path`, refusing (BadInputError naming it) what could hang or flood
    the reader: a FIFO or device (opened non-blocking, then checked), a link out of
    `inside`, a file over `limit` bytes."""
    where = str(path)
    resolved = path.resolve()
    if inside is not None and not resolved.is_relative_to(inside):
        raise BadInputError(where, f"is a link to {resolved}, outside the data root")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise BadInputError(where, f"cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BadInputError(where, "is not a regular file (a FIFO, device or folder)")
        if info.st_size > limit:
            raise BadInputError(where, f"is {info.st_size} bytes; at most {limit}")
        return handle.read(limit + 1)
