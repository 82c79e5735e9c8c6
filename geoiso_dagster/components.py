"""geoiso-dagster as a Dagster component (`dg`): a pipeline of geo steps declared in a
defs.yaml, without Python:

    type: geoiso_dagster.components.GeoPipeline
    attributes:
      steps:
        - name: clipped_countries
          task: geoiso_dagster.ops:clip
          upstream: reprojected_features
          inputs: {mask: mask.parquet}     # a .parquet name: <data root>/reference/<name>
          splittable: true
        - name: buffered_countries
          task: geoiso_dagster.ops:buffer
          upstream: clipped_countries      # another asset: its output of the partition
          options: {distance: 10000}

Its definitions are the whole code location (build_definitions): the built-in assets,
the inbox sensor, the worker pool and executor, plus one geo_asset per step.
Orchestration layer: no geo import (tests/test_layers.py).
"""

from typing import Any, Optional

import dagster as dg

from geoiso_dagster.defs.build import build_definitions
from geoiso_dagster.defs.steps import Reference, geo_asset

__all__ = ["GeoPipeline", "GeoStep"]


class GeoStep(dg.Model):
    """One step: geo_asset(name, task=..., upstream=..., ...) (README, Add your own step)."""

    name: str
    task: str
    upstream: str
    inputs: dict[str, str] = {}
    options: dict[str, Any] = {}
    splittable: bool = False
    description: Optional[str] = None


class GeoPipeline(dg.Component, dg.Model, dg.Resolvable):
    """The geoiso-dagster code location: raw_features -> reprojected_features ->
    dissolved_regions per source file, the inbox sensor, the isolated worker pool, and
    the steps declared here, each with the envelope of the built-in ones (staged write,
    read-back, blocking check, metadata, retries). Inputs ending in .parquet are
    reference layers in <data root>/reference/; other inputs name assets."""

    steps: list[GeoStep] = []
    worker_env: dict[str, str] = {}

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        assets = [
            geo_asset(
                step.name,
                task=step.task,
                upstream=step.upstream,
                inputs={
                    keyword: Reference(value) if value.endswith(".parquet") else value
                    for keyword, value in step.inputs.items()
                },
                options=step.options,
                splittable=step.splittable,
                description=step.description,
            )
            for step in self.steps
        ]
        return build_definitions(assets, worker_env=self.worker_env or None)
