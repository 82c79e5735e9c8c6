"""A team's own worker functions, as a user would write them (worker layer: imports
geopandas), for tests/test_user_steps.py. Named as "tests.standins.user_steps:function"."""

import time

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.ops.frames import read, write
from geoiso_dagster.pool import progress


def area_km2(source: str, output: str, equal_area_crs: str = "EPSG:6933") -> dict:
    """Each feature's area in km2 (computed in an equal-area CRS), as a column."""
    frame = read(source)
    progress(f"measuring {len(frame)} features", done=0, total=len(frame))
    frame["area_km2"] = frame.geometry.to_crs(equal_area_crs).area / 1e6
    facts = write(frame, output)
    return {"rows": facts["rows"], "largest_km2": float(frame["area_km2"].max())}


def refuse_small(source: str, output: str, at_least: int = 1000) -> dict:
    """Bad input for a source with fewer features than `at_least`."""
    frame = read(source)
    if len(frame) < at_least:
        raise BadInputError(source, f"has {len(frame)} features, fewer than {at_least}")
    return write(frame, output)


def overstate_rows(source: str, output: str) -> dict:
    """Writes the source and reports one row more than it wrote."""
    facts = write(read(source), output)
    return {"rows": facts["rows"] + 1}


def sleep(source: str, output: str, seconds: float) -> dict:
    time.sleep(seconds)
    return write(read(source), output)


def not_a_dict(source: str, output: str) -> list:
    return [source]


def hoard(source: str, output: str) -> dict:
    """Allocates until the memory ceiling stops the worker."""
    blocks = []
    while True:
        blocks.append(bytearray(32 * 2**20))
        blocks[-1][::4096] = b"\1" * len(blocks[-1][::4096])


def crash(source: str, output: str) -> dict:
    """Dies as a segfault in native code would."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
    return {}


def plain_to_parquet(source: str, output: str) -> dict:
    """The README's contract followed with nothing but geopandas: read the source, write
    GeoParquet to `output` (which needs its folder to exist: the envelope makes it)."""
    import geopandas

    frame = geopandas.read_parquet(source)
    frame.to_parquet(output)
    return {"rows": len(frame)}


# A second output kind, FlatGeobuf (tests/test_user_steps.py's FlatGeobufOutput): the
# function that writes it, and the two worker tasks the kind names.
def to_flatgeobuf(source: str, output: str, drop: int = 0) -> dict:
    """The source as FlatGeobuf (less its last `drop` rows, reporting all of them)."""
    import pyogrio

    frame = read(source)
    pyogrio.write_dataframe(frame.iloc[: len(frame) - drop], output, driver="FlatGeobuf")
    return {"rows": len(frame)}


def inspect_flatgeobuf(path: str, expected_crs_of: str | None = None) -> dict:
    """The read-back of a staged FlatGeobuf file, trusting nothing its writer said."""
    import pyogrio

    try:
        info = pyogrio.read_info(path)
        frame = pyogrio.read_dataframe(path)
    except Exception as exc:
        return {"path": path, "readable": False, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "path": path,
        "readable": True,
        "driver": info["driver"],
        "rows": len(frame),
        "crs": frame.crs.to_string() if frame.crs else "",
        "valid": int(frame.geometry.is_valid.sum()),
    }


def describe_flatgeobuf(path: str) -> dict:
    """The standard facts of a FlatGeobuf file a function wrote."""
    import os

    import pyogrio

    info = pyogrio.read_info(path)
    return {
        "path": path,
        "rows": int(info["features"]),
        "bytes": os.path.getsize(path),
        "crs": info["crs"] or "",
    }
