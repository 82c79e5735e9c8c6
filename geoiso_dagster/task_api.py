"""What a worker task may call back into, below both the pool (pool/) and the worker layer
(spatial/, a team's own steps), so that no task imports the pool's internals: `progress`
here, the error types in errors.py, the GDAL jail in gdal_jail.py; and task references,
which the pool checks and the worker resolves.

A task reference is "package.module:function" (any importable module, such as a team's
own steps) or the bare name of a built-in task ("ingest", "inspect", ...). References are
fixed in code, when the definitions are built: run config never chooses one (a field
that did would let whoever launches a run make the workers import any module).

The worker process connects `progress` to its pool when it starts (pool/worker.py);
called anywhere else (a test, a notebook), it does nothing.
"""

import importlib
import re
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


# Dotted module path, then one public function name: no attribute chains, no private
# names, nothing but identifiers.
_REF = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:)?[A-Za-z][A-Za-z0-9_]*")


def check_task_ref(ref: str) -> str:
    """`ref` itself when it is a well-formed task reference; ValueError naming it if not."""
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        raise ValueError(
            f"bad task reference {ref!r}: expected 'package.module:function' (a public "
            "function of an importable module) or the name of a built-in task"
        )
    return ref


def is_qualified(ref: str) -> bool:
    """Whether `ref` names its module ("package.module:function")."""
    return ":" in ref


def resolve_task(ref: str, default_module: str | None) -> Callable[..., dict]:
    """The function a task reference names: "package.module:function", or a bare name of
    `default_module` (the built-in tasks; None: bare names name nothing). Imported here,
    in the worker, where the geo stack may load."""
    module, _, name = check_task_ref(ref).rpartition(":")
    module = module or default_module
    if module is None:
        raise LookupError(f"task {ref!r} names no module, and the pool was given no task module")
    target = getattr(importlib.import_module(module), name, None)
    if not callable(target):
        raise LookupError(f"no function {name!r} in module {module!r}")
    return target


__all__ = ["check_task_ref", "is_qualified", "progress", "resolve_task"]
