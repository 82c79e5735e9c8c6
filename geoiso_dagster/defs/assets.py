"""raw_features -> reprojected_features -> dissolved_regions, one GeoParquet file per
source file, each built with geo_asset (defs/steps.py). The steps here only
orchestrate: the work runs in the worker pool."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dagster import Config
from pydantic import Field

from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.outputs import (
    CRS,
    IN_RANGE,
    READABLE,
    ROW_COUNT,
    SOURCE_COUNTS,
    UNIQUE_KEYS,
    VALID,
)
from geoiso_dagster.defs.own_steps import Step
from geoiso_dagster.defs.steps import BATCH_MAX_FILES, GROUP, POOL, geo_asset, spec_of
from geoiso_dagster.settings import check_aggregations, check_layer, check_target_crs

__all__ = [
    "ASSET_NAMES",
    "BATCH_MAX_FILES",
    "GROUP",
    "POOL",
    "DissolveConfig",
    "IngestConfig",
    "ReprojectConfig",
    "dissolved_regions",
    "geo_assets",
    "raw_features",
    "reprojected_features",
]


class IngestConfig(Config):
    layer: Optional[str] = Field(
        default=None,
        description="The layer to read, required when the source holds several (a "
        "GeoPackage with two tables); a file with one layer needs none.",
    )


class ReprojectConfig(Config):
    target_crs: str = Field(
        default="EPSG:4326", description="Any CRS PROJ understands: 'EPSG:6933', WKT, PROJJSON."
    )


class DissolveConfig(Config):
    dissolve_by: str = Field(default="region_id", description="Column whose values name a region.")
    aggfunc: str = Field(
        default="first", description="pandas aggregation for the other columns (first, sum, ...)."
    )
    aggregations: dict[str, str] = Field(
        default_factory=dict, description="Per-column aggregation, overriding aggfunc."
    )


@dataclass(frozen=True)
class IngestStep(Step):
    """The source file read (fanned out over feature ranges when large) into GeoParquet."""

    library: str = "gdal"
    criteria: tuple[str, ...] = (READABLE, ROW_COUNT, IN_RANGE, SOURCE_COUNTS)
    facts: tuple[str, ...] = ("fanned_out_over",)
    sidecar: tuple[tuple[str, type], ...] = (("layer", str),)

    def produce(self, runner, source: str, staged: Path, inputs: dict, options: dict):
        return fanout.ingest(runner, source, staged, layer=options["layer"])

    def inspect_kwargs(self, source: str, options: dict) -> dict:
        return {"source": source, "layer": options["layer"]}

    def check(self, options: dict, where: str | None = None) -> None:
        if options.get("layer") is not None:
            check_layer(options["layer"], where=where or "layer")


@dataclass(frozen=True)
class ReprojectStep(Step):
    """The upstream output in the target CRS (fanned out over row groups when large)."""

    library: str = "proj"
    criteria: tuple[str, ...] = (READABLE, ROW_COUNT, CRS, IN_RANGE)
    facts: tuple[str, ...] = ("transformed", "dropped_m", "fanned_out_over")
    sidecar: tuple[tuple[str, type], ...] = (("target_crs", str),)

    def produce(self, runner, source: str, staged: Path, inputs: dict, options: dict):
        return fanout.reproject(runner, source, staged, options["target_crs"])

    def inspect_kwargs(self, source: str, options: dict) -> dict:
        return {"expected_crs": options["target_crs"]}

    def check(self, options: dict, where: str | None = None) -> None:
        if "target_crs" in options:
            check_target_crs(options["target_crs"], where=where or "target_crs")


@dataclass(frozen=True)
class DissolveStep(Step):
    """One (multi)polygon per key (fanned out over key ranges and giant groups)."""

    library: str = "geos"
    criteria: tuple[str, ...] = (READABLE, ROW_COUNT, CRS, VALID, UNIQUE_KEYS, IN_RANGE)
    facts: tuple[str, ...] = (
        "repaired_geometries",
        "dropped_null_keys",
        "dropped_non_polygonal",
        "coverage_union_groups",
        "unary_union_groups",
        "fanned_out_over",
        "giant_groups",
        "union_tasks",
    )
    sidecar: tuple[tuple[str, type], ...] = (
        ("dissolve_by", str),
        ("aggfunc", str),
        ("aggregations", dict),
    )

    def produce(self, runner, source: str, staged: Path, inputs: dict, options: dict):
        return fanout.dissolve(
            runner,
            source,
            staged,
            dissolve_by=options["dissolve_by"],
            aggfunc=options["aggfunc"],
            aggregations=dict(options["aggregations"]),
        )

    def inspect_kwargs(self, source: str, options: dict) -> dict:
        return {
            "expected_crs_of": source,
            "unique_key": options["dissolve_by"],
            "geometries": "all",
        }

    def check(self, options: dict, where: str | None = None) -> None:
        aggregations = dict(options.get("aggregations", {}))
        check_aggregations(options.get("aggfunc", "first"), aggregations, where=where or "config")


raw_features = geo_asset(
    "raw_features",
    task=IngestStep(),
    config=IngestConfig,
    description="The source file as stored in GeoParquet 1.1: GeoPackage, shapefile (also "
    "zipped), GeoJSON, FlatGeobuf or GeoParquet. Refused with a clear error when it has no "
    "CRS, no features, or several layers and no `layer` setting.",
)

reprojected_features = geo_asset(
    "reprojected_features",
    task=ReprojectStep(),
    upstream=raw_features,
    config=ReprojectConfig,
    description="raw_features in the target CRS (config target_crs, default EPSG:4326). When "
    "the source is already in that CRS the geometries are copied untouched.",
)

dissolved_regions = geo_asset(
    "dissolved_regions",
    task=DissolveStep(),
    upstream=reprojected_features,
    config=DissolveConfig,
    description="One valid (multi)polygon per value of config dissolve_by: invalid geometries "
    "repaired with make_valid (a MultiPolygon becomes its parts' union), only polygonal parts "
    "kept, other columns aggregated, plus a feature_count column.",
)

geo_assets = [raw_features, reprojected_features, dissolved_regions]
# The built-in chain's names, in order, as their specs hold them.
ASSET_NAMES = tuple(spec_of(definition).name for definition in geo_assets)
