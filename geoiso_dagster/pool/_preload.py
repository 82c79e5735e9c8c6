"""Imported once by the forkserver so that every forked worker starts warm.

Nothing here may touch GDAL or PROJ state beyond loading the libraries: the
forkserver has no data open and no threads, which is what makes forking from it safe.
"""

import atexit
import importlib.machinery
import os
import sys


def adopt_parent_main() -> None:
    """Make the forkserver's __main__ look like the parent's, so that multiprocessing's
    preparation of each forked worker finds __main__ "already populated" and skips
    re-running the parent's main module (a script, the dagster CLI) in the worker.
    Workers never need it: they run functions named by module, never from __main__."""
    main = sys.modules["__main__"]
    if spec_name := os.environ.pop("GEOISO_PARENT_MAIN_SPEC", None):
        main.__spec__ = importlib.machinery.ModuleSpec(spec_name, None)
    if main_file := os.environ.pop("GEOISO_PARENT_MAIN_FILE", None):
        main.__file__ = main_file


adopt_parent_main()


def die_with_the_run_process() -> None:
    """The kernel kills the forkserver when the thread that started it (the run
    process's keeper thread, _forkserver._in_keeper) ends, even if it is stopped: a
    stopped forkserver (and so its workers) outlived a killed run until continued."""
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


die_with_the_run_process()

# The forkserver holds no data, files or locks: when its pool closes it, let it exit at
# once instead of tearing down pandas & co. (measured: the pool's close waited 0.26 s
# for that, a quarter of a small file's whole run). Forked workers never run atexit.
atexit.register(os._exit, 0)

import geopandas  # noqa: E402, F401
import pyarrow.parquet  # noqa: E402, F401
import pyogrio  # noqa: E402, F401
import pyproj  # noqa: E402, F401
import shapely  # noqa: E402, F401

try:  # the optional GDAL bindings: load them before the fork too, when installed
    from osgeo import gdal  # noqa: F401
except ImportError:
    pass
