"""The pipeline benchmark: this project against the plain recipe, side by side.

    .venv/bin/python -m benchmarks.run [--sizes 10000 100000 1000000] [--repeats 3]

For each size, a Voronoi coverage (benchmarks/data.py) as a GeoPackage goes through:
  plain      the recipe most tutorials give: a fresh process pool per call; read_file;
             to_crs; buffer(0).buffer(0); dissolve(by, aggfunc="first"); write GeoJSON
  inproc     a plain in-process geopandas pipeline over GeoParquet, no isolation
  pool       this project's three steps through WorkerPool, planned and fanned out over
             the workers exactly as the assets do (defaults: forkserver, 2 workers, a
             fresh worker per task); no Dagster, no checks
  cli        end to end through a real `dagster asset materialize` of all three assets
             (checks included) on a temporary instance, timed from the command's start to
             its exit; the partition is registered before it (`geoiso add`, timed apart)
Prints medians of --repeats runs, ratios against `plain` and `inproc` from the same run,
peak worker RSS, and checks every result's areas against the plain one (1e-9 relative).
Results also go to benchmarks/results/<time>.json (git-ignored), and what it prints to
benchmarks/results/run.txt (benchmarks/results.py).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import geopandas
import shapely

from benchmarks.data import CACHE, dataset
from benchmarks.results import recorded
from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.pool import PoolSettings, WorkerPool
from tests.harness.live import materialize_command

TARGET_CRS = "EPSG:4326"
BY = "region_id"
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def _plain_recipe(source: str, output: str) -> None:
    frame = geopandas.read_file(source)
    frame = frame.to_crs(TARGET_CRS)
    frame["geometry"] = frame.buffer(0).buffer(0)
    dissolved = frame.dissolve(by=BY, aggfunc="first")
    dissolved.to_file(output, driver="GeoJSON")


def plain(gpkg: Path, parquet: Path, work: Path) -> dict:
    output = work / "plain.geojson"
    with ProcessPoolExecutor(max_workers=1) as executor:  # a fresh pool per call
        executor.submit(_plain_recipe, str(gpkg), str(output)).result()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"output": output, "peak_rss_mb": peak}


def inproc(gpkg: Path, parquet: Path, work: Path) -> dict:
    geopandas.read_file(gpkg).to_parquet(work / "raw.parquet")
    geopandas.read_parquet(work / "raw.parquet").to_crs(TARGET_CRS).to_parquet(work / "rep.parquet")
    frame = geopandas.read_parquet(work / "rep.parquet")
    frame["geometry"] = frame.make_valid()
    frame.dissolve(by=BY, aggfunc="first").to_parquet(work / "inproc.parquet")
    return {"output": work / "inproc.parquet"}


def pool(gpkg: Path, parquet: Path, work: Path, settings: PoolSettings | None = None) -> dict:
    """The three steps as the assets run them (defs/fanout.py: the same survey, plans
    and fan-out over the workers), on a bare pool: no Dagster, no checks."""
    # The workers' jail is the data root: the cached data and the work folder are in it.
    settings = settings or PoolSettings(task_module=TASK_MODULE, data_root=str(CACHE))
    with WorkerPool(settings) as workers:
        runner = TaskRunner(workers)
        steps = [
            fanout.ingest(runner, str(gpkg), work / "raw.parquet"),
            fanout.reproject(runner, str(work / "raw.parquet"), work / "rep.parquet", TARGET_CRS),
            fanout.dissolve(
                runner, str(work / "rep.parquet"), work / "pool.parquet", dissolve_by=BY
            ),
        ]
    return {
        "output": work / "pool.parquet",
        "peak_rss_mb": max(step.peak_rss_mb for step in steps),
        "steps_s": [step.duration_s for step in steps],
    }


def cli(gpkg: Path, parquet: Path, work: Path) -> dict:
    home, root = work / "home", work / "data"
    home.mkdir(exist_ok=True)
    shutil.copy(REPO / "deploy" / "local" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEOISO_DATA_ROOT": str(root)}
    registering = time.perf_counter()
    key = subprocess.run(
        [BIN / "geoiso", "add", str(gpkg)], env=env, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    config = {
        "ops": {
            "reprojected_features": {"config": {"target_crs": TARGET_CRS}},
            "dissolved_regions": {"config": {"dissolve_by": BY}},
        }
    }
    started = time.perf_counter()
    run = subprocess.run(
        materialize_command(key, config),
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    materialize_s = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return {
        "output": root / "warehouse" / "dissolved_regions" / f"{key}.parquet",
        "timed_s": materialize_s,
        "geoiso_add_s": started - registering,
    }


METHODS = {"plain": plain, "inproc": inproc, "pool": pool, "cli": cli}


def _read(path: Path) -> geopandas.GeoDataFrame:
    frame = geopandas.read_file(path) if path.suffix == ".geojson" else geopandas.read_parquet(path)
    return frame.reset_index().set_index(BY).sort_index()


def same_result(reference: Path, other: Path) -> tuple[bool, float]:
    """Same groups, valid geometries, areas equal to 1e-9 relative (in the target CRS's
    units, as every method computed them); returns (ok, worst relative area difference)."""
    a, b = _read(reference), _read(other)
    if list(a.index) != list(b.index) or not shapely.is_valid(b.geometry.values).all():
        return False, float("inf")
    rel = abs(a.geometry.area - b.geometry.area) / a.geometry.area
    return bool((rel <= 1e-9).all()), float(rel.max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    report = {}
    for n in args.sizes:
        gpkg, parquet = dataset(n)
        rows = {}
        for name in args.methods:
            times, adds, extra = [], [], {}
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                    started = time.perf_counter()
                    result = METHODS[name](gpkg, parquet, Path(tmp))
                    times.append(result.pop("timed_s", time.perf_counter() - started))
                    adds.append(result.pop("geoiso_add_s", 0.0))
                    kept = (
                        Path(tempfile.gettempdir())
                        / f"geoiso-bench-{n}-{name}{result['output'].suffix}"
                    )
                    shutil.copy(result["output"], kept)
                    extra = {k: v for k, v in result.items() if k != "output"} | {"output": kept}
            rows[name] = {"median_s": statistics.median(times), "runs_s": times, **extra}
            if any(adds):
                rows[name]["geoiso_add_median_s"] = statistics.median(adds)
        reference = rows["plain"]["output"] if "plain" in rows else None
        for row in rows.values():
            if reference is not None:
                row["same_as_plain"], row["worst_rel_area_diff"] = same_result(
                    reference, row["output"]
                )
            row["output"] = str(row["output"])
        report[n] = {"input_geoparquet_mb": parquet.stat().st_size / 2**20, "methods": rows}
        _print(n, report[n])
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))


def _print(n: int, entry: dict) -> None:
    rows = entry["methods"]
    print(f"\n{n:,} polygons (input GeoParquet {entry['input_geoparquet_mb']:.1f} MB), medians:")
    print(
        f"{'method':<8}{'median s':>10}{'vs plain':>10}{'vs inproc':>11}{'peak RSS MB':>13}"
        f"{'RSS/input':>11}  same result"
    )
    for name, row in rows.items():
        vs_plain = rows["plain"]["median_s"] / row["median_s"] if "plain" in rows else float("nan")
        vs_inproc = (
            rows["inproc"]["median_s"] / row["median_s"] if "inproc" in rows else float("nan")
        )
        peak = row.get("peak_rss_mb")
        ratio = peak / entry["input_geoparquet_mb"] if peak else None
        print(
            f"{name:<8}{row['median_s']:>10.2f}{vs_plain:>9.2f}x{vs_inproc:>10.2f}x"
            f"{peak or float('nan'):>13.0f}{ratio or float('nan'):>10.1f}x  "
            f"{row.get('same_as_plain', '-')} ({row.get('worst_rel_area_diff', 0):.1e})"
        )
    if "cli" in rows:
        print(
            "cli: the `dagster asset materialize` command (start to exit); registering the "
            f"partition before it (`geoiso add`) took {rows['cli']['geoiso_add_median_s']:.2f} s"
        )


if __name__ == "__main__":
    with recorded("run"):
        main()
