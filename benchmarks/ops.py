"""Multi-input steps at 1M x 10k features: geoiso_dagster.ops fanned out over the pool
(the decisions a geo_asset step takes, defs/own_steps.py) against the whole-frame
geopandas call in one process, measured in the same run.

    .venv/bin/python -m benchmarks.ops [--rows 1000000] [--zones 10000] [--ops clip,overlay,sjoin]

Left: a Voronoi coverage of `rows` polygons (EPSG:3035), written as every output here is
(GeoParquet 1.1, bbox covering, Hilbert order, row groups of 50,000). Right: a coverage of
`zones` polygons over the same extent; clip uses a third of them as its mask. The
baseline reads both files with geopandas.read_parquet, calls geopandas.clip / overlay /
sjoin on the whole frames and writes the result with to_parquet, in a fresh process.
Both results are compared (rows, total area). Prints seconds, the ratio, and peak RSS.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.data import CACHE, voronoi_coverage
from benchmarks.results import recorded
from geoiso_dagster.defs.own_steps import TaskStep
from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.pool import PoolSettings, WorkerPool

OPS = {
    "clip": ("geoiso_dagster.ops:clip", "mask", "mask"),
    "overlay": ("geoiso_dagster.ops:overlay", "other", "zones"),
    "sjoin": ("geoiso_dagster.ops:sjoin", "right", "zones"),
}

BASELINE = """
import json, resource, sys, time
import geopandas
op, left_path, right_path, output = sys.argv[1:]
started = time.perf_counter()
left, right = geopandas.read_parquet(left_path), geopandas.read_parquet(right_path)
if op == "clip":
    left = left.set_geometry(left.make_valid())  # as ops.clip repairs (none are invalid here)
    result = geopandas.clip(left, right)
elif op == "overlay":
    result = geopandas.overlay(left, right, how="intersection")
else:
    result = geopandas.sjoin(left, right, predicate="intersects").drop(columns="index_right")
result.to_parquet(output)
print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(result),
                  "area": float(result.area.sum()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def layers(rows: int, zones: int) -> dict[str, Path]:
    """The three GeoParquet layers, made once (benchmarks/.data/)."""
    from geoiso_dagster.spatial import io

    CACHE.mkdir(exist_ok=True)
    paths = {
        "left": CACHE / f"ops_left_{rows}.parquet",
        "zones": CACHE / f"ops_zones_{zones}.parquet",
        "mask": CACHE / f"ops_mask_{zones}.parquet",
    }
    if not paths["left"].exists():
        io.write_geoparquet(voronoi_coverage(rows), paths["left"])
    if not (paths["zones"].exists() and paths["mask"].exists()):
        frame = voronoi_coverage(zones, seed=7).rename(
            columns={"region_id": "zone_block", "name": "zone", "population": "zone_pop"}
        )
        io.write_geoparquet(frame, paths["zones"])
        io.write_geoparquet(frame.iloc[::3], paths["mask"])
    return paths


def ours(op: str, paths: dict, output: Path, workers: int) -> dict:
    import geopandas

    task, keyword, layer = OPS[op]
    step = TaskStep(task=task, name=op, splittable=True)
    settings = PoolSettings(
        task_module=TASK_MODULE, max_workers=workers, memory_limit_mb=6144, task_timeout_s=3600
    )
    # Started (and warmed up) before the clock: a run's steps share a started pool, as the
    # baseline's timer starts after its interpreter has imported geopandas.
    with WorkerPool(settings) as pool:
        pool.run("environment")
        started = time.perf_counter()
        result = step.produce(
            TaskRunner(pool), str(paths["left"]), output, {keyword: str(paths[layer])}, {}
        )
        seconds = time.perf_counter() - started
    written = geopandas.read_parquet(output)
    return {
        "seconds": seconds,
        "rows": len(written),
        "area": float(written.area.sum()),
        "peak_rss_mb": result.peak_rss_mb,
        "parts": result.facts.get("fanned_out_over", 1),
    }


def baseline(op: str, paths: dict, output: Path) -> dict:
    _, _, layer = OPS[op]
    done = subprocess.run(
        [sys.executable, "-c", BASELINE, op, str(paths["left"]), str(paths[layer]), str(output)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--zones", type=int, default=10_000)
    parser.add_argument("--ops", default="clip,overlay,sjoin")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    paths = layers(args.rows, args.zones)
    out = sys.stdout
    out.write(f"{args.rows:,} x {args.zones:,} features, {args.workers} workers\n")
    out.write("op        whole-frame  fan-out     ratio  rows (both)   peak MB whole/worker\n")
    with tempfile.TemporaryDirectory() as tmp:
        for op in args.ops.split(","):
            plain = baseline(op, paths, Path(tmp) / f"{op}-plain.parquet")
            mine = ours(op, paths, Path(tmp) / f"{op}-ours.parquet", args.workers)
            same = plain["rows"] == mine["rows"] and abs(
                plain["area"] - mine["area"]
            ) <= 1e-9 * max(plain["area"], 1.0)
            out.write(
                f"{op:9} {plain['seconds']:9.1f} s {mine['seconds']:7.1f} s "
                f"{plain['seconds'] / mine['seconds']:7.2f}x  {mine['rows']:>11,} "
                f"{'same' if same else 'DIFFERENT'}  {plain['peak_rss_mb']:6.0f} / "
                f"{mine['peak_rss_mb']:.0f}  ({mine['parts']} parts)\n"
            )
            out.flush()


if __name__ == "__main__":
    with recorded("ops"):
        main()
