"""The shapes of what crosses the line between the layers: what a task returns (a dict,
so that it pickles as plain data and a user's function can build it), written down as
TypedDicts. Geo-free; importable from both layers. `total=False` where a key is there
only in some cases.

OutputFacts  every task that writes an output file returns at least these
             (spatial/io.describe); geo_asset steps of one's own get them from the
             `describe` task, plus whatever the function returned (StepFacts).
ReadBack     the `inspect` task's independent read of a staged file, judged by the
             blocking check (defs/checks.py).
"""

from typing import Any, TypedDict

__all__ = ["Column", "OutputFacts", "ReadBack", "StepFacts"]


class Column(TypedDict):
    name: str
    type: str  # the Arrow type, as text


class OutputFacts(TypedDict):
    path: str
    rows: int
    row_groups: int
    bytes: int
    crs: str  # "EPSG:6933", or the CRS's name when it has no authority code
    crs_name: str
    bbox: list[float]  # [minx, miny, maxx, maxy], [] when no geometry
    geometry_types: list[str]  # GeoParquet's names: "Polygon", "MultiPolygon", ...
    columns: list[Column]
    versions: dict[str, str]  # library -> version, of the worker that wrote it


# What a worker function of one's own returns (geo_asset's `task`): any JSON-able facts.
# `rows`, when present, is checked against the file; other numbers, booleans and strings
# (up to 200 characters) go to the catalog under their own names.
StepFacts = dict[str, Any]


class ReadBack(TypedDict, total=False):
    path: str
    readable: bool  # False: `error` says why, and nothing else is there
    error: str
    geo_version: str
    bbox_covering: bool
    rows: int
    crs: str
    geometries_checked: str  # "all" or "sample" (the first row group)
    missing_geometries: int
    empty_geometries: int
    invalid_geometries: int
    expected_crs: str
    crs_matches: bool
    bbox_seen: list[float] | None
    crs_limits: list[float]
    present_geometries: int | None
    in_crs_range: bool
    duplicate_keys: int | None  # with a unique key: None when the column is missing
    source_features: int | None  # raw_features: what the source declares (-1 unknown)
    source_geometries: int | None  # a shapefile: records its .shx gives a shape
    source_error: str
    etag: str  # a staged object of an S3 root
