"""The blocking asset check: each output is read back by a worker and judged before
anything downstream runs. A failed check fails the step, so downstream is skipped.

One check per asset, `integrity`, judges every criterion of that asset and shows each
verdict in its metadata. One check, not one per criterion, because every check result is
an event the instance writes for every file: with a check per criterion (14 for the three
assets) the writes cost more than the geo work of a small file (DagsterInstance on
SQLite: 11.5 ms each, measured by benchmarks/small_files.py)."""

import warnings

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, MetadataValue
from dagster._utils.warnings import PreviewWarning  # not exported; the one to silence here

from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.records import OutputFacts, ReadBack

READABLE = "readable_geoparquet"
ROW_COUNT = "row_count_matches"
CRS = "crs_matches_target"
VALID = "geometries_valid_nonempty"
UNIQUE_KEYS = "dissolve_keys_unique"
IN_RANGE = "coordinates_in_crs_range"
SOURCE_COUNTS = "counts_match_source"

_DESCRIPTIONS = {
    READABLE: "The file reads back as GeoParquet 1.1 with a bbox covering column, and its "
    "geometries decode (the first row group; every row of dissolved_regions).",
    ROW_COUNT: "Rows in the file equal the row count the step reported.",
    CRS: "The file's CRS equals the target CRS (compared with pyproj, not as text).",
    VALID: "Every geometry is present, non-empty and valid.",
    UNIQUE_KEYS: "Each dissolve key appears exactly once.",
    IN_RANGE: "The file's bbox (from its bbox column's statistics) lies where its CRS can "
    "hold coordinates: latitude within +/-90 and longitude within +/-360 degrees, or within "
    "1e8 m of a projected CRS's origin.",
    SOURCE_COUNTS: "Rows equal the feature count the source file itself declares, and for a "
    "shapefile the rows with a geometry equal the shapes its .shx index lists (read again "
    "from the source, independently of the step).",
}
CHECK = "integrity"
CRITERIA_BY_ASSET = {
    "raw_features": (READABLE, ROW_COUNT, IN_RANGE, SOURCE_COUNTS),
    "reprojected_features": (READABLE, ROW_COUNT, CRS, IN_RANGE),
    "dissolved_regions": (READABLE, ROW_COUNT, CRS, VALID, UNIQUE_KEYS, IN_RANGE),
}
# A step of the user's own (geo_asset with a task reference): its file reads back, holds
# the rows the task reported, keeps its input's CRS and lies where that CRS can.
STEP_CRITERIA = (READABLE, ROW_COUNT, CRS, IN_RANGE)
CRITERIA = tuple(_DESCRIPTIONS)


def criteria_of(asset: str, criteria: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The criteria `asset` is judged by: `criteria` when given (checked against the
    known ones), else the built-in asset's own."""
    if criteria is None:
        return CRITERIA_BY_ASSET[asset]
    unknown = [name for name in criteria if name not in _DESCRIPTIONS]
    if unknown or not criteria:
        raise ValueError(f"{asset}: unknown check criteria {unknown}; known: {CRITERIA}")
    return tuple(criteria)


def check_specs(asset: str, criteria: tuple[str, ...] | None = None) -> list[AssetCheckSpec]:
    # Partitioned check specs are a Dagster preview feature (pinned: dagster <1.14); they
    # are what makes a check result say which source file it is about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return [
            AssetCheckSpec(
                CHECK,
                asset=asset,
                description=description(asset, criteria),
                blocking=True,
                partitions_def=source_files,  # results per source file, like the asset's
            )
        ]


def description(asset: str, criteria: tuple[str, ...] | None = None) -> str:
    listed = "\n".join(
        f"- `{name}`: {_DESCRIPTIONS[name]}" for name in criteria_of(asset, criteria)
    )
    return f"The file as written, read back by a worker, meets every criterion:\n{listed}"


def _judge(name: str, written: OutputFacts, seen: ReadBack) -> tuple[bool, dict]:
    if not seen.get("readable"):
        return False, {"error": seen.get("error", "unreadable")}
    if name == READABLE:
        ok = seen["geo_version"] == "1.1.0" and seen["bbox_covering"]
        return ok, {"geo_version": seen["geo_version"], "bbox_covering": seen["bbox_covering"]}
    if name == ROW_COUNT:
        return seen["rows"] == written["rows"], {
            "in_file": seen["rows"],
            "reported": written["rows"],
        }
    if name == CRS:
        return bool(seen.get("crs_matches")), {"crs": seen["crs"], "expected": seen["expected_crs"]}
    if name == VALID:
        bad = seen["missing_geometries"] + seen["empty_geometries"] + seen["invalid_geometries"]
        return bad == 0, {
            "missing": seen["missing_geometries"],
            "empty": seen["empty_geometries"],
            "invalid": seen["invalid_geometries"],
        }
    if name == UNIQUE_KEYS:
        duplicates = seen.get("duplicate_keys")
        return duplicates == 0, {"duplicate_keys": -1 if duplicates is None else duplicates}
    if name == IN_RANGE:
        return bool(seen["in_crs_range"]), {
            "bbox": seen["bbox_seen"] or [],
            "crs_limits": seen["crs_limits"],
        }
    if name == SOURCE_COUNTS:
        return _judge_source_counts(seen)
    raise ValueError(f"unknown check {name!r}")


def _judge_source_counts(seen: ReadBack) -> tuple[bool, dict]:
    if "source_error" in seen:
        return False, {"error": seen["source_error"]}
    declared, shapes = seen.get("source_features"), seen.get("source_geometries")
    metadata = {"rows": seen["rows"], "source_declares": -1 if declared is None else declared}
    ok = declared is None or declared < 0 or declared == seen["rows"]
    if shapes is not None:
        present = seen["present_geometries"]
        metadata.update(with_geometry=-1 if present is None else present, source_shapes=shapes)
        ok = ok and present == shapes
    return ok, metadata


def verdicts(
    asset: str, written: OutputFacts, seen: ReadBack, criteria: tuple[str, ...] | None = None
) -> dict[str, tuple[bool, dict]]:
    """Each criterion of `asset`: (passed, what was compared)."""
    return {name: _judge(name, written, seen) for name in criteria_of(asset, criteria)}


def check_results(
    asset: str, written: OutputFacts, seen: ReadBack, criteria: tuple[str, ...] | None = None
) -> list[AssetCheckResult]:
    """The asset's check result, from the step's facts and the worker's read-back: passed
    when every criterion passed; each criterion's verdict and values in the metadata."""
    judged = verdicts(asset, written, seen, criteria)
    failed = [name for name, (passed, _) in judged.items() if not passed]
    metadata = {"failed": ", ".join(failed) or "none"}
    for name, (passed, values) in judged.items():
        metadata[name] = MetadataValue.json({"passed": passed, **values})
    return [
        AssetCheckResult(
            asset_key=AssetKey(asset),
            check_name=CHECK,
            passed=not failed,
            severity=AssetCheckSeverity.ERROR,
            metadata=metadata,
        )
    ]
