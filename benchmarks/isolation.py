"""Per-task cost of isolation: a fresh worker per task vs a reused one, forkserver vs spawn.

    .venv/bin/python benchmarks/isolation.py [--tasks 12]

Each configuration runs the same tasks through a real WorkerPool (one worker, so the
numbers are per task, not per core): a no-op task, which is pure overhead, and a real
ingest of the Natural Earth countries (read shapefile, write GeoParquet). Prints
medians and ratios against the reused-worker baseline measured in the same run.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyogrio

from geoiso_dagster.pool import PoolSettings, WorkerPool

SHP = Path(pyogrio.__file__).parent / "tests/fixtures/naturalearth_lowres/naturalearth_lowres.shp"
CONFIGS = {
    "reused worker (forkserver)": PoolSettings(max_workers=1, max_tasks_per_worker=0),
    "fresh worker per task (forkserver)": PoolSettings(max_workers=1, max_tasks_per_worker=1),
    "fresh worker per task (spawn)": PoolSettings(
        max_workers=1, max_tasks_per_worker=1, start_method="spawn"
    ),
}


def measure(settings: PoolSettings, tasks: int, out: Path) -> dict[str, float]:
    timings: dict[str, list[float]] = {"noop": [], "ingest": []}
    with WorkerPool(settings) as pool:
        pool.run("environment")  # warm: start-up of the pool itself is not per task
        for i in range(tasks):
            for name, kwargs in (
                ("noop", {}),
                ("ingest", {"source": str(SHP), "output": str(out / f"{i}.parquet")}),
            ):
                function = "environment" if name == "noop" else "ingest"
                started = time.perf_counter()
                pool.run(function, **kwargs)
                timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=12)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, settings in CONFIGS.items():
            results[label] = measure(settings, args.tasks, Path(tmp))
    base = results["reused worker (forkserver)"]
    print(f"median of {args.tasks} tasks, one worker")
    print(f"{'configuration':<38}{'no-op task':>12}{'ingest 177':>12}{'overhead':>11}{'ratio':>8}")
    for label, r in results.items():
        overhead_ms = (r["ingest"] - base["ingest"]) * 1000
        print(
            f"{label:<38}{r['noop'] * 1000:>10.1f}ms{r['ingest'] * 1000:>10.1f}ms"
            f"{overhead_ms:>9.1f}ms{r['ingest'] / base['ingest']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
