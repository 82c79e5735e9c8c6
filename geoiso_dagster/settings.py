"""Validation of the settings users pass (run config, sidecars). No geo imports.

A setting is data, never a way to reach a file: PROJ strings can name files to read
(+init=..., +nadgrids=/path), and pandas aggregation names are attribute look-ups,
so both are checked before any worker sees them.
"""

import functools
import json
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
MAX_JSON_DEPTH = 64  # PROJJSON nests a dozen levels; a hostile one nests 100,000

# The forms a target CRS may take; anything else is refused before PROJ sees it.
# 1. An authority code: EPSG:6933, OGC:CRS84, ESRI:54009, IAU_2015:30100, or as a URN.
_AUTHORITY_CODE = re.compile(
    r"^(?:urn:ogc:def:crs:)?[A-Za-z][A-Za-z0-9_]*:{1,2}[A-Za-z0-9_.]+$", re.IGNORECASE
)
# 2. A CRS name PROJ looks up in its database ("WGS 84", "ETRS89 / LAEA Europe").
_CRS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9 _.,:()/+\-]*$")
# 3. A PROJ string: +key or +key=value tokens; a value is a word, a number or a list of
#    them, and a grid is named, never given by path (PROJ then looks only in its own
#    data directories). Separators, '~', quotes and leading dots never appear.
_PROJ_TOKEN = re.compile(r"^\+?[A-Za-z_][A-Za-z0-9_]*(?:=[A-Za-z0-9_.,:@+\-]*)?$")
_PROJ_GRID_ITEM = re.compile(r"^@?[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# PROJ string keys whose values PROJ opens as files (grids, init files, models).
_PROJ_FILE_KEYS = {
    "nadgrids", "geoidgrids", "grids", "xy_grids", "z_grids", "file", "model", "init",
    "hgrids", "vgrids", "t_grids",
}  # fmt: skip
# 4./5. WKT and PROJJSON: their file references (PARAMETERFILE, parameter_file, a
#    PROJ4_GRIDS or PROJ4 extension) are refused, and so is any path-like text in them.
_WKT_START = re.compile(
    r"^\s*(?:GEOGCS|PROJCS|GEOCCS|COMPD_CS|VERT_CS|VERTCS|LOCAL_CS|GEOGCRS|GEODCRS|PROJCRS|"
    r"BOUNDCRS|COMPOUNDCRS|VERTCRS|ENGCRS|DERIVEDPROJCRS|GEOGRAPHICCRS|GEODETICCRS|"
    r"PROJECTEDCRS|BASEGEOGCRS)\s*\[",
    re.IGNORECASE,
)
_WKT_FILE = re.compile(r"PARAMETERFILE|PROJ4_GRIDS|\bINIT\s*=", re.IGNORECASE)
_WKT_QUOTED = re.compile(r'"((?:[^"]|"")*)"')
_PATHLIKE = re.compile(r"[/\\~]|^\s*\.")
# In a name (of a CRS, or any text inside WKT or PROJJSON, which PROJ never opens: files
# are named only by the keys refused above): what starts like a path or climbs out of
# one. EPSG's own names hold slashes ("Schwarzeck / Lo22/25").
_NAME_PATHLIKE = re.compile(r"^\s*[/~.]|\\|(?:^|/)\.\.(?:/|$)|//")


def check_target_crs(value: str, where: str = "target_crs") -> str:
    """Refuse a CRS setting that is not one of the allowed forms, or that could make PROJ
    open a file of the setter's choosing (init files, grids by path, in PROJ strings,
    WKT1/WKT2 and PROJJSON alike). Parsing happens later, in a worker."""
    return check_crs(value, where, "target_crs")


def check_crs(value: str, where: str, what: str) -> str:
    """`value` as a CRS definition PROJ may be given: a setting (`what` names it) or what
    a source declares (a .prj, a header, a GeoPackage's table, `geo` metadata, a GeoJSON
    crs member): one grammar for all, since PROJ cannot tell them apart. BadInputError
    naming `where` (the setting or the file) otherwise."""
    why = why_not_crs(value) if isinstance(value, str) else "is not text"
    if why:
        shown = value[:80] if isinstance(value, str) else value
        raise BadInputError(where, f"{what} {shown!r} {why}")
    return value


@functools.lru_cache(maxsize=256)
def why_not_crs(value: str) -> str | None:
    """Why `value` may not be given to PROJ, or None (remembered: a step checks the same
    definition in every file it reads)."""
    text = value.strip()
    if not text:
        return "is empty"
    if len(value) > MAX_SETTING_LENGTH:
        return f"is longer than {MAX_SETTING_LENGTH} characters"
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        return "holds control characters"
    if text.startswith("{"):
        return _why_not_projjson(text)
    if _WKT_START.match(text):
        return _why_not_wkt(text)
    if "+" in text or "=" in text:
        return _why_not_proj_string(text)
    if _AUTHORITY_CODE.match(text):
        return None
    if _CRS_NAME.match(text) and not _NAME_PATHLIKE.search(text):
        return None
    return "is not an authority code (EPSG:6933), a CRS name, a PROJ string, WKT or PROJJSON"


def _why_not_proj_string(text: str) -> str | None:
    for token in text.split():
        if not _PROJ_TOKEN.match(token):
            if _PATHLIKE.search(token):
                return "names a file path; grids and init files by path are not allowed"
            return f"has a PROJ parameter that is not a plain key=value: {token[:40]!r}"
        key, _, val = token.lstrip("+").partition("=")
        if key.lower() == "init":
            return "uses +init=, which reads a PROJ init file; name the CRS (EPSG:xxxx) instead"
        if key.lower() in _PROJ_FILE_KEYS:
            bad = [item for item in val.split(",") if not _PROJ_GRID_ITEM.match(item)]
            if bad:
                return f"names a grid by path ({bad[0][:40]!r}); name grids, never give paths"
    return None


def _why_not_wkt(text: str) -> str | None:
    if _WKT_FILE.search(text):
        return "references a grid or parameter file (PARAMETERFILE, PROJ4_GRIDS); not allowed"
    for match in _WKT_QUOTED.finditer(text):
        if why := _why_not_value(match.group(1)):
            return why
    return None


def _why_not_value(value: str) -> str | None:
    """A text value inside WKT or PROJJSON: an embedded PROJ string (EXTENSION["PROJ4",
    "+proj=..."]) obeys the PROJ-string rules; anything else may not look like a path."""
    if "+" in value and "=" in value:
        return _why_not_proj_string(value)
    if _NAME_PATHLIKE.search(value):
        return f"holds a path-like value {value[:40]!r}; files are never referenced"
    return None


def _why_not_projjson(text: str) -> str | None:
    try:
        document = json.loads(text)
    except RecursionError:
        return "is nested too deeply to be PROJJSON"
    except ValueError as exc:
        return f"starts like PROJJSON but is not JSON: {exc}"
    stack: list[tuple[object, int, str]] = [(document, 0, "")]
    while stack:
        node, depth, key = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"is nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(node, dict):
            for child_key, child in node.items():
                if str(child_key).lower() in ("parameter_file", "grids", "file"):
                    return f"references a file ({child_key!r}); not allowed"
                stack.append((child, depth + 1, str(child_key)))
        elif isinstance(node, list):
            stack.extend((child, depth + 1, key) for child in node)
        elif isinstance(node, str) and key != "$schema" and (why := _why_not_value(node)):
            return why
    return None


def check_layer(value: str, where: str = "layer") -> str:
    """A layer name: text of at most 255 characters without control characters."""
    if not isinstance(value, str) or not value or len(value) > 255:
        raise BadInputError(where, f"layer {str(value)[:80]!r} must be a name of 1-255 characters")
    if any(ord(c) < 32 for c in value):
        raise BadInputError(where, f"layer {value[:80]!r} holds control characters")
    return value


def check_aggregations(aggfunc: str, aggregations: dict[str, str], where: str = "config") -> None:
    for column, name in {"(all columns)": aggfunc, **aggregations}.items():
        if name not in AGGREGATIONS:
            raise BadInputError(
                where,
                f"aggregation {name!r} for {column} is not one of {sorted(AGGREGATIONS)}",
            )
