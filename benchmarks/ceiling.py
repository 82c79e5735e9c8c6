"""A worker ceiling below what the whole-frame pipeline needs still lets this project's
pipeline through.

    .venv/bin/python -m benchmarks.ceiling [--size 1000000] [--fraction 0.5]

1. the whole-frame pipeline (benchmarks/tasks.py: read everything, to_crs, make_valid,
   dissolve) in one worker of a pool: its peak RSS is the whole-frame need;
2. this project's three steps, planned as the assets plan them (benchmarks/run.py's
   `pool`), in a pool whose ceiling is --fraction of that need: they must succeed, with
   every region's area equal to the whole-frame one (1e-9 relative);
3. the whole-frame pipeline again under that same ceiling: the pool must stop it.
"""

import argparse
import tempfile
from pathlib import Path

import geopandas

from benchmarks.data import dataset
from benchmarks.results import recorded
from benchmarks.run import BY, TARGET_CRS, pool
from geoiso_dagster.errors import MemoryLimitError
from geoiso_dagster.pool import PoolSettings, WorkerPool
from geoiso_dagster.pool.pool import usable_memory_mb

TASKS = "benchmarks.tasks"


def whole_frame(gpkg: Path, memory_limit_mb: int) -> tuple[float | str, dict[str, float] | None]:
    """(peak RSS in MB, areas by key); or (what the pool said, None) when it was stopped."""
    settings = PoolSettings(max_workers=1, memory_limit_mb=memory_limit_mb, task_module=TASKS)
    with WorkerPool(settings) as workers:
        try:
            result = workers.run(
                "whole_frame", source=str(gpkg), target_crs=TARGET_CRS, dissolve_by=BY
            )
        except MemoryLimitError as exc:
            return str(exc), None
    return result.peak_rss_mb, result.facts["areas"]


def measure(size: int, fraction: float) -> dict:
    gpkg, parquet = dataset(size)
    need, areas = whole_frame(gpkg, memory_limit_mb=usable_memory_mb())  # no ceiling to speak of
    assert areas is not None
    ceiling = int(need * fraction)
    with tempfile.TemporaryDirectory() as tmp:
        streamed = pool(
            gpkg, parquet, Path(tmp), PoolSettings(memory_limit_mb=ceiling, task_module=TASKS)
        )
        out = geopandas.read_parquet(streamed["output"]).set_index(BY).geometry.area
    worst = max(abs(out.loc[int(k)] - a) / a for k, a in areas.items())
    stopped_at, stopped_areas = whole_frame(gpkg, memory_limit_mb=ceiling)
    return {
        "polygons": size,
        "input_geoparquet_mb": parquet.stat().st_size / 2**20,
        "whole_frame_need_mb": need,
        "ceiling_mb": ceiling,
        "streamed_peak_mb": streamed["peak_rss_mb"],
        "same_areas": len(out) == len(areas) and worst <= 1e-9,
        "worst_rel_area_diff": worst,
        "whole_frame_stopped_under_ceiling": stopped_areas is None,
        "whole_frame_under_ceiling": stopped_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--fraction", type=float, default=0.5)
    args = parser.parse_args()
    r = measure(args.size, args.fraction)
    print(f"{r['polygons']:,} polygons, input GeoParquet {r['input_geoparquet_mb']:.1f} MB")
    print(f"whole-frame pipeline, peak worker RSS:       {r['whole_frame_need_mb']:>7.0f} MB")
    print(f"ceiling given to every worker ({args.fraction:.0%} of it): {r['ceiling_mb']:>7.0f} MB")
    print(
        f"this pipeline under it, peak worker RSS:     {r['streamed_peak_mb']:>7.0f} MB "
        f"({r['streamed_peak_mb'] / r['input_geoparquet_mb']:.1f}x the input); same areas: "
        f"{r['same_areas']} (worst {r['worst_rel_area_diff']:.1e})"
    )
    print(
        "whole-frame pipeline under it: "
        + ("stopped: " if r["whole_frame_stopped_under_ceiling"] else "NOT stopped: ")
        + str(r["whole_frame_under_ceiling"])
    )


if __name__ == "__main__":
    with recorded("ceiling"):
        main()
