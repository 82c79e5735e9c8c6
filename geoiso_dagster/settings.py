"""Validation of the settings users pass (run config, sidecars). No geo imports.

A setting is data, never a way to reach a file: PROJ strings can name files to read
(+init=..., +nadgrids=/path), and pandas aggregation names are attribute look-ups,
so both are checked before any worker sees them.
"""

import re

from geoiso_dagster.errors import BadInputError

AGGREGATIONS = frozenset(
    {
        "first",
        "last",
        "sum",
        "mean",
        "median",
        "min",
        "max",
        "count",
        "nunique",
        "std",
        "var",
        "prod",
    }
)
MAX_SETTING_LENGTH = 20_000  # a PROJJSON or WKT can be long; nothing legitimate is longer
# A PROJ parameter whose value is a path: +nadgrids=/x, +geoidgrids=@./x, +init=~/x ...
_FILE_VALUE = re.compile(r"=\s*@?\s*[/~.]")


def check_target_crs(value: str, where: str = "target_crs") -> str:
    """Refuse CRS settings that could make PROJ read a file of the user's choosing."""
    why = None
    if not value or not value.strip():
        why = "is empty"
    elif len(value) > MAX_SETTING_LENGTH:
        why = f"is longer than {MAX_SETTING_LENGTH} characters"
    elif "init=" in value.lower():
        why = "uses +init=, which reads a PROJ init file; name the CRS (EPSG:xxxx) instead"
    elif "\\" in value or _FILE_VALUE.search(value):
        why = "names a file path; grids and init files by path are not allowed"
    if why:
        raise BadInputError(where, f"target_crs {value[:80]!r} {why}")
    return value


def check_aggregations(aggfunc: str, aggregations: dict[str, str], where: str = "config") -> None:
    for column, name in {"(all columns)": aggfunc, **aggregations}.items():
        if name not in AGGREGATIONS:
            raise BadInputError(
                where,
                f"aggregation {name!r} for {column} is not one of {sorted(AGGREGATIONS)}",
            )
