"""geoiso-dagster: heavy geopandas/GDAL steps in isolated worker processes, as Dagster
assets.

The public surface (README, "Add your own step"):
    geo_asset, Reference, build_definitions   the Dagster side (no geo import)
    geoiso_dagster.errors.BadInputError       raise it for bad data in a worker function
    geoiso_dagster.ops                        ready worker functions (clip, overlay, ...)
    geoiso_dagster.ops.frames                 read / write helpers for worker functions
    geoiso_dagster.pool.WorkerPool            the pool on its own, with or without asyncio
    geoiso_dagster.pool.progress              progress messages from a worker function

Loaded lazily: a worker process imports this package without Dagster, and the
orchestrator imports it without a geo library.
"""

__all__ = ["Reference", "build_definitions", "geo_asset"]


def __getattr__(name: str):
    if name in ("geo_asset", "Reference"):
        from geoiso_dagster.defs import steps

        return getattr(steps, name)
    if name == "build_definitions":
        from geoiso_dagster.defs.build import build_definitions

        return build_definitions
    raise AttributeError(f"module 'geoiso_dagster' has no attribute {name!r}")
