"""The project's exception hierarchy: one type per kind of failure in DESIGN.md.

Importable everywhere (orchestration, pool, worker): it imports no geo library. A worker
function of one's own raises BadInputError for bad data (never retried) and
TransientIOError for a fault that may pass (retried); the rest are the pool's.
"""

__all__ = [
    "BadInputError",
    "GeoisoError",
    "MemoryLimitError",
    "StorageAccessError",
    "TaskError",
    "TransientIOError",
    "UnsafeNameError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerTimeoutError",
]


class GeoisoError(Exception):
    """Base class of every error this project raises on purpose."""

    retryable = False


class BadInputError(GeoisoError):
    """The input (file, key, setting) cannot give a correct output. Never retried."""

    def __init__(self, path: str, cause: str) -> None:
        super().__init__(f"{path}: {cause}")
        self.path = path
        self.cause = cause


class UnsafeNameError(BadInputError):
    """A partition key or file name that could escape the data root."""


class TransientIOError(GeoisoError):
    """An operating-system I/O error that may pass (disk full, NFS hiccup). Retried."""

    retryable = True


class StorageAccessError(GeoisoError):
    """The data root's storage refuses it: the object store (403, no such bucket), or a
    folder (read-only, unwritable, removed while a run wrote into it). A setting or an
    operator's fix, never the input's fault, never retried. The message names the bucket
    or the folder and the OS error, never a credential."""


class WorkerError(GeoisoError):
    """A worker process did not return a result."""


class WorkerTimeoutError(WorkerError):
    """The task ran past its timeout; the worker was killed. Retried."""

    retryable = True


class WorkerCrashedError(WorkerError):
    """The worker died (signal, segfault, OOM-kill). Retried."""

    retryable = True


class MemoryLimitError(WorkerError):
    """The worker went over its memory ceiling. Not retried: same input, same result."""


class TaskError(GeoisoError):
    """The task raised an exception nobody classified: a bug. Not retried. The message is
    one line; the worker's traceback is kept apart, for whoever debugs it."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback
