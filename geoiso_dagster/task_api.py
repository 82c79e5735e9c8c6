"""What a worker task may call back into, below both the pool (pool/) and the worker layer
(spatial/, a team's own steps), so that no task imports the pool's internals: `progress`
here, the error types in errors.py, the GDAL jail in gdal_jail.py.

The worker process connects `progress` to its pool when it starts (pool/worker.py);
called anywhere else (a test, a notebook), it does nothing.
"""

from collections.abc import Callable

_report: Callable[[str, dict], None] | None = None


def progress(message: str, **facts: object) -> None:
    """Report what the current task is doing: the message reaches the caller's
    on_progress callback (in Dagster, the run's log) before the task's result does.
    Numbers such as done=, total= and unit= feed the step's status lines."""
    if _report is not None:
        _report(message, facts)


def connect(report: Callable[[str, dict], None]) -> None:
    """Where progress() sends from now on: called once by a worker as it starts."""
    global _report
    _report = report


__all__ = ["progress"]
