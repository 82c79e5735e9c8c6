"""Start multiprocessing's forkserver with the worker environment and the geo stack.

The forkserver is one per process (a multiprocessing global). Workers fork from it,
so they inherit its environment and its already-imported libraries: GDAL and PROJ
are loaded once, after the environment is set and before any data is opened, and no
native state from the run process can cross a fork because the run process never
loads them. Pools in one process share it; the last pool to close stops it.
"""

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import sys
import threading
from collections.abc import Iterator

_PRELOAD = ["geoiso_dagster.pool._preload"]
# How the forkserver learns what the parent's __main__ is (see _preload.adopt_parent_main).
MAIN_FILE_ENV = "GEOISO_PARENT_MAIN_FILE"
MAIN_SPEC_ENV = "GEOISO_PARENT_MAIN_SPEC"
_lock = threading.Lock()
_users = 0
_env_started_with: dict[str, str] | None = None
_keeper: "queue.SimpleQueue | None" = None
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def acquire(
    env: dict[str, str], modules: tuple[str, ...] = ()
) -> multiprocessing.context.BaseContext:
    """A forkserver context whose server runs with `env` and has imported the geo stack
    and `modules` (the pool's task module: its caller's); pair with `release()`."""
    global _users, _env_started_with
    ctx = multiprocessing.get_context("forkserver")
    with _lock:
        if _users == 0:
            _stop_unlocked()
        elif env != _env_started_with:
            # Another pool in this process started it with other settings; workers
            # still apply their own environment in their initializer.
            log.warning("forkserver already running with another worker environment")
        if _users == 0 or _env_started_with is None:
            ctx.set_forkserver_preload([*_PRELOAD, *modules])
            with _environ(env | _parent_main()):
                _in_keeper(multiprocessing.forkserver.ensure_running)
            _env_started_with = dict(env)
        _users += 1
    return ctx


def _in_keeper(fn) -> None:
    """Run `fn` in this process's keeper thread, which lives as long as the process. The
    forkserver asks the kernel to kill it when its parent dies (_preload.py), and the
    kernel means the thread that started it: started from a thread of the moment (an
    `async with` pool starts from one of asyncio's), it would die with that thread."""
    global _keeper
    if _keeper is None:
        _keeper = queue.SimpleQueue()
        threading.Thread(
            target=_keep, args=(_keeper,), name="geoiso-forkserver", daemon=True
        ).start()
    done: queue.SimpleQueue = queue.SimpleQueue()
    _keeper.put((fn, done))
    error = done.get()
    if error is not None:
        raise error


def _keep(requests: "queue.SimpleQueue") -> None:
    while True:
        fn, done = requests.get()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done.put(exc)
        else:
            done.put(None)


def _parent_main() -> dict[str, str]:
    """Name this process's __main__ the way multiprocessing's spawn preparation does.

    Every new worker would otherwise re-run the parent's main module as __mp_main__:
    under the dagster CLI that imports all of Dagster into each worker (measured: about
    750 ms per fresh worker, and Dagster loaded where only geo code belongs).
    """
    main = sys.modules["__main__"]
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None:
        return {MAIN_SPEC_ENV: spec_name}
    main_file = getattr(main, "__file__", None)
    if main_file is None:
        return {}
    if not os.path.isabs(main_file) and multiprocessing.process.ORIGINAL_DIR is not None:
        main_file = os.path.join(multiprocessing.process.ORIGINAL_DIR, main_file)
    return {MAIN_FILE_ENV: os.path.normpath(main_file)}


def release() -> None:
    """Stop the forkserver once no pool in this process uses it: no process left behind."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0:
            _stop_unlocked()


def _stop_unlocked() -> None:
    global _env_started_with
    # multiprocessing has no public way to stop its forkserver; _stop() is what its own
    # test-suite uses, and it is present from Python 3.8 on.
    multiprocessing.forkserver._forkserver._stop()
    _env_started_with = None
