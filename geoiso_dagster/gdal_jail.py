"""Leave only the allowed GDAL drivers registered in a worker: an allow-list, enforced by
GDAL itself.

GDAL registers ~180 drivers at load, among them formats that open other files or URLs
(OGR VRT, GML with xlinks, WFS, HTTP, ...). pyogrio offers no way to restrict the drivers
an open may use, so every driver not on the list is unregistered through GDAL's C API,
in every copy of libgdal the process has loaded (pyogrio's bundled one and, when the
osgeo bindings are installed, the system one). pyogrio registers drivers once, at import,
so the list stays as left. No geo import here: the worker's initializer calls this after
the geo stack is loaded.
"""

import ctypes
import re

_LIBGDAL = re.compile(r"(/\S*libgdal[^/\s]*\.so[^/\s]*)$")


def loaded_libgdal() -> list[str]:
    """Paths of the libgdal copies mapped into this process."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libgdal" not in line:
                continue
            match = _LIBGDAL.search(line.strip())
            if match:
                found.add(match.group(1))
    return sorted(found)


def _bind(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.GDALGetDriverCount.restype = ctypes.c_int
    lib.GDALGetDriver.restype = ctypes.c_void_p
    lib.GDALGetDriver.argtypes = [ctypes.c_int]
    lib.GDALGetDriverShortName.restype = ctypes.c_char_p
    lib.GDALGetDriverShortName.argtypes = [ctypes.c_void_p]
    lib.GDALDeregisterDriver.restype = None
    lib.GDALDeregisterDriver.argtypes = [ctypes.c_void_p]
    return lib


def registered(lib: ctypes.CDLL) -> list[str]:
    return [
        lib.GDALGetDriverShortName(lib.GDALGetDriver(i)).decode()
        for i in range(lib.GDALGetDriverCount())
    ]


def restrict_drivers(allowed: frozenset[str]) -> dict[str, list[str]]:
    """Unregister every driver not in `allowed`; return what stays registered, by library.

    Raises RuntimeError when no libgdal is loaded (the caller loads the geo stack first) or
    when a driver outside the list is still registered afterwards."""
    libraries = loaded_libgdal()
    if not libraries:
        raise RuntimeError("no libgdal is loaded in this process: nothing to restrict")
    left = {}
    for path in libraries:
        lib = _bind(path)
        for index in reversed(range(lib.GDALGetDriverCount())):
            handle = lib.GDALGetDriver(index)
            if lib.GDALGetDriverShortName(handle).decode() not in allowed:
                lib.GDALDeregisterDriver(handle)
        left[path] = registered(lib)
        if set(left[path]) - allowed:
            raise RuntimeError(f"GDAL drivers outside the allow-list remain in {path}")
    return left


def _bind_config(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.CPLGetConfigOptions.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.CPLGetConfigOptions.argtypes = []
    lib.CSLDestroy.restype = None
    lib.CSLDestroy.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
    lib.CPLSetConfigOption.restype = None
    lib.CPLSetConfigOption.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return lib


def config_options(libraries: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Every GDAL configuration option set in this process, by libgdal copy (those of
    `libraries`, default: every copy loaded now)."""
    found = {}
    for path in loaded_libgdal() if libraries is None else libraries:
        lib = _bind_config(ctypes.CDLL(path))
        options = lib.CPLGetConfigOptions()
        values: dict[str, str] = {}
        index = 0
        while options and options[index] is not None:
            key, _, value = options[index].decode("utf-8", "replace").partition("=")
            values[key] = value
            index += 1
        if options:
            lib.CSLDestroy(options)
        found[path] = values
    return found


def restore_config_options(baseline: dict[str, dict[str, str]]) -> list[str]:
    """Put GDAL's configuration back to `baseline` (from config_options, whose libgdal
    copies it covers); return the names of the options that had changed."""
    changed = []
    for path, now in config_options(list(baseline)).items():
        was = baseline[path]
        if now == was:
            continue
        lib = _bind_config(ctypes.CDLL(path))
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                value = was.get(key)
                lib.CPLSetConfigOption(key.encode(), None if value is None else value.encode())
                changed.append(f"GDAL option {key}")
    return changed


def clear_network_cache() -> None:
    """Drop what GDAL's network file systems (/vsis3/, /vsicurl/) cached of the objects
    read (sizes, existence, blocks), in every libgdal copy loaded."""
    for path in loaded_libgdal():
        lib = ctypes.CDLL(path)
        lib.VSICurlClearCache.restype = None
        lib.VSICurlClearCache.argtypes = []
        lib.VSICurlClearCache()
