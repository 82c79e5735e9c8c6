"""Output kinds: what kind of file a geo asset publishes, and everything the envelope
needs to know about it (defs/envelope.py).

The envelope (stage, read back, judge, publish, describe) is the same for every kind; an
OutputKind says what differs: the file's suffix, the worker task that reads a staged file
back (locally, or downloaded from a bucket root's staged object), the task that describes
a file a function of one's own wrote, the criteria its blocking check can judge and how,
and what the catalog shows of it. GeoParquet (GEOPARQUET) is the built-in one; a raster
kind is a subclass of its own, with no edit to the envelope.

Orchestration layer: nothing here imports a geo library.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

from dagster import MetadataValue, TableColumn, TableSchema

from geoiso_dagster.records import OutputFacts, ReadBack

__all__ = ["GEOPARQUET", "GeoParquetOutput", "OutputKind"]


@dataclass(frozen=True)
class OutputKind:
    """A kind of output file. A subclass gives judge() and catalog().

    name: Dagster's kind tag of the assets that publish it ("geoparquet").
    suffix: of the published file, <data root>/warehouse/<asset>/<partition><suffix>.
    read_back: the worker task that reads a staged file back, trusting nothing its writer
      said: called as read_back(path=..., **the step's expectations) and returning facts
      for judge() ("module:function", or a built-in task's name). With a bucket root the
      staged object is downloaded first and the same task reads it.
    describe: the worker task that returns the standard facts (records.OutputFacts) of a
      file a function of one's own wrote, called as describe(path=...).
    criteria: every criterion judge() knows, with the description the check shows.
    default_criteria: what a step of one's own publishing this kind is judged by.
    joins_parts: the built-in fan-out can join parts of this kind (a splittable task).
    """

    name: str
    suffix: str
    read_back: str
    describe: str
    criteria: Mapping[str, str] = field(default_factory=dict)
    default_criteria: tuple[str, ...] = ()
    joins_parts: bool = False

    def __post_init__(self) -> None:
        if not (self.suffix.startswith(".") and self.suffix[1:].isalnum()):
            raise ValueError(f"output kind {self.name!r}: bad suffix {self.suffix!r}")
        unknown = [c for c in self.default_criteria if c not in self.criteria]
        if unknown:
            raise ValueError(f"output kind {self.name!r}: unknown default criteria {unknown}")

    def judge(self, criterion: str, written: OutputFacts, seen: ReadBack) -> tuple[bool, dict]:
        """(passed, what was compared) for one criterion, from the step's facts and the
        read-back's."""
        raise NotImplementedError(f"output kind {self.name!r} does not judge {criterion!r}")

    def catalog(self, facts: Mapping) -> dict:
        """The catalog entries of a published file of this kind, from the step's facts
        (the envelope adds where it is and which worker made it)."""
        return {}


READABLE = "readable_geoparquet"
ROW_COUNT = "row_count_matches"
CRS = "crs_matches_target"
VALID = "geometries_valid_nonempty"
UNIQUE_KEYS = "dissolve_keys_unique"
IN_RANGE = "coordinates_in_crs_range"
SOURCE_COUNTS = "counts_match_source"

_GEOPARQUET_CRITERIA = {
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


@dataclass(frozen=True)
class GeoParquetOutput(OutputKind):
    """GeoParquet 1.1 with a bbox covering column (spatial/io.py writes it): read back by
    the `inspect` task (spatial/tasks/readback.py)."""

    name: str = "geoparquet"
    suffix: str = ".parquet"
    read_back: str = "inspect"
    describe: str = "describe"
    criteria: Mapping[str, str] = field(default_factory=lambda: dict(_GEOPARQUET_CRITERIA))
    # A step of one's own: its file reads back, holds the rows the task reported, keeps
    # its input's CRS and lies where that CRS can.
    default_criteria: tuple[str, ...] = (READABLE, ROW_COUNT, CRS, IN_RANGE)
    joins_parts: bool = True

    def judge(self, criterion: str, written: OutputFacts, seen: ReadBack) -> tuple[bool, dict]:
        if criterion == READABLE:
            ok = seen["geo_version"] == "1.1.0" and seen["bbox_covering"]
            return ok, {"geo_version": seen["geo_version"], "bbox_covering": seen["bbox_covering"]}
        if criterion == ROW_COUNT:
            return seen["rows"] == written["rows"], {
                "in_file": seen["rows"],
                "reported": written["rows"],
            }
        if criterion == CRS:
            return bool(seen.get("crs_matches")), {
                "crs": seen["crs"],
                "expected": seen["expected_crs"],
            }
        if criterion == VALID:
            bad = seen["missing_geometries"] + seen["empty_geometries"] + seen["invalid_geometries"]
            return bad == 0, {
                "missing": seen["missing_geometries"],
                "empty": seen["empty_geometries"],
                "invalid": seen["invalid_geometries"],
            }
        if criterion == UNIQUE_KEYS:
            duplicates = seen.get("duplicate_keys")
            return duplicates == 0, {"duplicate_keys": -1 if duplicates is None else duplicates}
        if criterion == IN_RANGE:
            return bool(seen["in_crs_range"]), {
                "bbox": seen["bbox_seen"] or [],
                "crs_limits": seen["crs_limits"],
            }
        if criterion == SOURCE_COUNTS:
            return _judge_source_counts(seen)
        return super().judge(criterion, written, seen)

    def catalog(self, facts: Mapping) -> dict:
        entry = {
            "dagster/row_count": MetadataValue.int(facts["rows"]),
            "dagster/column_schema": TableSchema(
                columns=[TableColumn(name=c["name"], type=c["type"]) for c in facts["columns"]]
            ),
            "crs": MetadataValue.text(facts["crs"]),
            "crs_name": MetadataValue.text(facts["crs_name"]),
            "bbox": MetadataValue.json({"minx_miny_maxx_maxy": facts["bbox"]}),
            "geometry_types": MetadataValue.text(", ".join(facts["geometry_types"])),
            "bytes": MetadataValue.int(facts["bytes"]),
            "row_groups": MetadataValue.int(facts["row_groups"]),
        }
        for library, version in facts["versions"].items():
            entry[f"{library}_version"] = MetadataValue.text(version)
        if "thumbnail_png" in facts:
            entry["map"] = MetadataValue.md(
                f"![{facts['rows']} regions](data:image/png;base64,{facts['thumbnail_png']})"
            )
        return entry


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


GEOPARQUET = GeoParquetOutput()
