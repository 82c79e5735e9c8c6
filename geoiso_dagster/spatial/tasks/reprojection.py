"""reprojected_features' task: to the target CRS, streamed row group by row group,
refusing what the target cannot represent."""

import time
from pathlib import Path

import numpy as np
import pyproj
import shapely

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.fsutil import atomic_path
from geoiso_dagster.settings import check_target_crs
from geoiso_dagster.spatial import faults, io, stream
from geoiso_dagster.task_api import progress


def drop_m(geometries: np.ndarray) -> tuple[np.ndarray, int]:
    """Remove M values, keeping Z. The transform does not carry M: GeoPandas' to_crs
    turns both Z and M of an XYZM geometry into NaN, and shapely.force_3d sets Z to 0."""
    measured = shapely.has_m(geometries)
    if not measured.any():
        return geometries, 0
    out = np.array(geometries, dtype=object, copy=True)
    has_z = shapely.has_z(geometries)
    for dimension, mask in ((3, measured & has_z), (2, measured & ~has_z)):
        if mask.any():
            out[mask] = shapely.from_wkb(shapely.to_wkb(out[mask], output_dimension=dimension))
    return out, int(measured.sum())


def target_crs_of(value: str, path: str) -> pyproj.CRS:
    """The target CRS, parsed here in a worker (under the pool's timeout) after the text
    passed the allow-list grammar; it must be horizontal: a vertical, geocentric or
    engineering CRS has no x and y to put features in."""
    check_target_crs(value, where=path)
    try:
        crs = io.parse_crs(value)
    except pyproj.exceptions.CRSError as exc:
        raise BadInputError(path, f"target_crs {value!r} is not a CRS PROJ knows: {exc}") from exc
    return io.check_horizontal(crs, path, f"target_crs {value[:80]!r}")


def reproject(
    source: str, output: str, target_crs: str, row_groups: list[int] | None = None
) -> dict:
    """reprojected_features: to `target_crs`, streamed row group by row group; a copy
    when the CRS already equals it (compared by pyproj, not as text). With `row_groups`,
    only those (one part of a fan-out over the workers; see `concatenate`)."""
    faults.at_start("reproject")
    target = target_crs_of(target_crs, source)
    source_crs = io.geoparquet_crs(io.ref(source))
    started = time.perf_counter()
    measured = 0
    if source_crs.equals(target) and row_groups is None:
        try:
            with atomic_path(Path(output)) as tmp, faults.around_write(tmp):
                io.copy_to(source, tmp)
        except OSError as exc:  # a full disk here is as transient as in the transform
            raise io.os_error(Path(output), exc, "writing") from exc
        progress(f"already in {io.crs_label(target)}; copied without a transform")
        facts = io.describe(Path(output))
        facts.update(transformed=False, dropped_m=0)
        return facts
    limits = _projected_area_of_use(target)

    def prepare(geometries: np.ndarray) -> np.ndarray:
        nonlocal measured
        geometries, dropped = drop_m(geometries)
        measured += dropped
        return geometries

    def check(bounds, nonfinite, present, first_row: int) -> None:
        _refuse_unrepresentable(bounds, nonfinite, present, first_row, source, target, limits)

    def report(done: int, total: int) -> None:
        progress(
            f"reprojected row group {done} of {total}",
            done=done,
            total=total,
            unit="row groups",
        )

    try:
        with atomic_path(Path(output)) as tmp, faults.around_write(tmp):
            written = stream.reproject_file(
                io.ref(source),
                tmp,
                source_crs,
                target,
                prepare,
                check,
                report,
                row_groups,
                part=row_groups is not None,
            )
    except OSError as exc:
        raise io.os_error(Path(output), exc, "writing") from exc
    progress(
        f"reprojected {written['rows']} features to {io.crs_label(target)} "
        f"in {time.perf_counter() - started:.2f} s"
        + (f" (dropped M values of {measured} measured geometries)" if measured else "")
    )
    if row_groups is not None:  # a part file: its facts go to `concatenate`
        return {
            "path": output,
            "rows": written["rows"],
            "runs": written["runs"],
            "transformed": True,
            "dropped_m": measured,
        }
    facts = io.describe(Path(output))
    facts.update(transformed=True, dropped_m=measured)
    return facts


# How far past the projected bounds of a CRS's area of use coordinates may lie before
# they are garbage rather than a little outside (a UTM zone's neighbour, say).
AREA_OF_USE_MARGIN = 0.5


def _projected_area_of_use(target: pyproj.CRS) -> tuple[float, float, float, float]:
    """Where coordinates in `target` are meaningful: its area of use, projected, with a
    margin; never beyond what the CRS can hold at all (io.coordinate_limits: latitude
    within +/-90 however wide the margin)."""
    hard = io.coordinate_limits(target)
    area = target.area_of_use
    if area is None:
        return hard
    to_target = pyproj.Transformer.from_crs("EPSG:4326", target, always_xy=True)
    minx, miny, maxx, maxy = to_target.transform_bounds(*area.bounds, densify_pts=21)
    if not np.isfinite([minx, miny, maxx, maxy]).all():
        return hard
    dx, dy = (maxx - minx) * AREA_OF_USE_MARGIN, (maxy - miny) * AREA_OF_USE_MARGIN
    soft = (minx - dx, miny - dy, maxx + dx, maxy + dy)
    return (*np.maximum(soft[:2], hard[:2]).tolist(), *np.minimum(soft[2:], hard[2:]).tolist())


def _refuse_unrepresentable(
    bounds: np.ndarray,
    nonfinite: np.ndarray,
    present: np.ndarray,
    first_row: int,
    source: str,
    target: pyproj.CRS,
    limits,
) -> None:
    """Refuse features the target CRS cannot hold: non-finite coordinates after the
    transform, or coordinates far outside where the CRS is defined (the poles in Web
    Mercator come out finite but meaningless, at y = 2.4e8 m). Takes the transformed
    features' bounds, non-finite mask and presence (neither null nor empty)."""
    bad = nonfinite.copy()
    where = "non-finite coordinates after the transform"
    outside = present & ~bad & io.outside_limits(bounds, limits)
    if outside.any():
        area = target.area_of_use.name.split(".")[0] if target.area_of_use else "its range"
        where = f"far outside where it is defined ({area})"
    bad |= outside
    if bad.any():
        rows = np.flatnonzero(bad) + first_row
        raise BadInputError(
            source,
            f"{len(rows)} feature(s) cannot be represented in {io.crs_label(target)}: "
            f"{where}, e.g. rows {rows[:5].tolist()}",
        )
