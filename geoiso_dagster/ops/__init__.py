"""Ready-made worker functions for geo_asset: clip, overlay, spatial join, buffer and
simplify. Use them as tasks, for example

    geo_asset("clipped", task="geoiso_dagster.ops:clip", upstream="reprojected_features",
              inputs={"mask": Reference("mask.parquet")}, splittable=True)

Each reads its source (one run of row groups when the step fans out: `row_groups`),
reads of the other layer only the features its bbox reaches (the layer's bbox covering
column; row groups lying apart are skipped), writes GeoParquet to `output` and returns
its facts. Their results equal geopandas.clip / overlay / sjoin / sjoin_nearest on the
whole frames (tests/test_ops.py), but for the right input's row positions (`index_right`
is not kept) and the rows' order. Worker layer: this package imports geopandas.
"""

import geopandas

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.ops.frames import (
    bounds_of,
    geometry_errors,
    read,
    read_near,
    same_crs,
    write,
)

__all__ = ["buffer", "clip", "overlay", "simplify", "sjoin"]

# overlay's `how` values whose result over the whole source is the union of its results
# over parts of it (union and symmetric_difference also hold the other layer's own parts).
OVERLAY_HOW = ("intersection", "difference", "identity")
SJOIN_PREDICATES = ("intersects", "within", "contains", "nearest")


def clip(
    source: str,
    output: str,
    mask: str,
    keep_geom_type: bool = False,
    repair: bool = True,
    row_groups: list[int] | None = None,
) -> dict:
    """The source's features cut to the mask layer's polygons (geopandas.clip). With
    `repair`, invalid geometries of either are made valid first (GEOS cannot cut them;
    a reprojection often makes a few): counted in `repaired_geometries`."""
    left = read(source, row_groups)
    right = read_near(mask, bounds_of(left))
    same_crs(left, right, mask)
    repaired = _repair(left) + _repair(right) if repair else 0
    with geometry_errors(source, mask):
        clipped = geopandas.clip(left, right, keep_geom_type=keep_geom_type)
    facts = {"mask_features_read": len(right), "repaired_geometries": repaired}
    return write(clipped, output) | facts


def overlay(
    source: str,
    output: str,
    other: str,
    how: str = "intersection",
    keep_geom_type: bool | None = None,
    repair: bool = True,
    row_groups: list[int] | None = None,
) -> dict:
    """geopandas.overlay of the source with another layer; the attributes of both.
    `repair` as for clip."""
    if how not in OVERLAY_HOW:
        raise BadInputError(f"how={how!r}", f"overlay here supports {', '.join(OVERLAY_HOW)}")
    left = read(source, row_groups)
    right = read_near(other, bounds_of(left))
    same_crs(left, right, other)
    repaired = _repair(left) + _repair(right) if repair else 0
    with geometry_errors(source, other):
        result = geopandas.overlay(left, right, how=how, keep_geom_type=keep_geom_type)
    facts = {"other_features_read": len(right), "repaired_geometries": repaired}
    return write(result, output) | facts


def _repair(frame: geopandas.GeoDataFrame) -> int:
    """Make the frame's invalid geometries valid in place; how many there were."""
    invalid = ~frame.geometry.is_valid & frame.geometry.notna()
    if invalid.any():
        frame.loc[invalid, frame.geometry.name] = frame.geometry[invalid].make_valid(
            method="structure", keep_collapsed=False
        )  # as the dissolve repairs (spatial/union.py): a MultiPolygon is its parts' union
    return int(invalid.sum())


def sjoin(
    source: str,
    output: str,
    right: str,
    predicate: str = "intersects",
    how: str = "inner",
    distance: float | None = None,
    row_groups: list[int] | None = None,
) -> dict:
    """Each source feature with the attributes of the features of `right` it meets
    (predicate intersects, within or contains: geopandas.sjoin), or of its nearest ones
    (predicate nearest: geopandas.sjoin_nearest, within `distance` when given, in the
    CRS's units, with a `distance` column)."""
    if predicate not in SJOIN_PREDICATES:
        raise BadInputError(f"predicate={predicate!r}", f"one of {', '.join(SJOIN_PREDICATES)}")
    if how not in ("inner", "left"):
        raise BadInputError(f"how={how!r}", "sjoin here supports inner and left")
    if distance is not None and (predicate != "nearest" or not distance >= 0):
        raise BadInputError(f"distance={distance!r}", "a distance >= 0, with predicate nearest")
    left = read(source, row_groups)
    with geometry_errors(source, right):
        other, joined = _join(left, right, predicate, how, distance)
    joined = joined.drop(columns=["index_right"])
    return write(joined, output) | {"right_features_read": len(other)}


def _join(left, right: str, predicate: str, how: str, distance: float | None):
    if predicate == "nearest":
        near = bounds_of(left, grow=distance) if distance is not None else None
        other = read_near(right, near)
        same_crs(left, other, right)
        joined = geopandas.sjoin_nearest(
            left, other, how=how, max_distance=distance, distance_col="distance"
        )
    else:
        other = read_near(right, bounds_of(left))
        same_crs(left, other, right)
        joined = geopandas.sjoin(left, other, how=how, predicate=predicate)
    return other, joined


def buffer(
    source: str,
    output: str,
    distance: float,
    quad_segs: int = 16,
    row_groups: list[int] | None = None,
) -> dict:
    """Each geometry grown (or shrunk, distance < 0) by `distance` in the CRS's units."""
    frame = read(source, row_groups)
    with geometry_errors(source):
        frame[frame.geometry.name] = frame.geometry.buffer(distance, quad_segs=quad_segs)
    return write(frame, output)


def simplify(
    source: str,
    output: str,
    tolerance: float,
    preserve_topology: bool = True,
    row_groups: list[int] | None = None,
) -> dict:
    """Each geometry simplified to `tolerance` (Douglas-Peucker; topology preserved)."""
    frame = read(source, row_groups)
    with geometry_errors(source):
        simplified = frame.geometry.simplify(tolerance, preserve_topology=preserve_topology)
    frame[frame.geometry.name] = simplified
    return write(frame, output)
