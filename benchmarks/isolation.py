"""Per-task cost of isolation: a fresh worker per task against a reused one.

    .venv/bin/python -m benchmarks.isolation [--repeats 12]

Every configuration runs the same work through a real WorkerPool of two workers (the
default), one task after another as a Dagster step runs them:
  no-op      a task that does nothing: pure overhead per task
  10k chain  the three steps on the 10,000-polygon benchmark GeoPackage (ingest,
             reproject to EPSG:4326, dissolve by region_id), planned as the assets plan
             them (defs/fanout.py), each step's output read back by `inspect` as the
             blocking checks do: six tasks
Configurations: workers reused for the pool's life (the baseline, and the default: a
Dagster run's pool serves one source file), a fresh worker per task from the preloaded
forkserver with and without the warm-up at worker start, and a fresh spawned worker
per task. Also: what a whole pool costs to start (forkserver with the geo stack, two
workers), which a run pays once. Prints medians and the overhead against the baseline
of the same run,
per task and as a share of the chain's time.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.data import CACHE, dataset
from benchmarks.results import recorded
from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.pool import PoolSettings, WorkerPool

CONFIGS = {
    "workers reused within the pool (the default)": PoolSettings(
        task_module=TASK_MODULE, data_root=str(CACHE), max_tasks_per_worker=0
    ),
    "fresh worker per task (forkserver, warm-up)": PoolSettings(
        task_module=TASK_MODULE, data_root=str(CACHE), max_tasks_per_worker=1
    ),
    "fresh worker per task (forkserver, no warm-up)": PoolSettings(
        task_module=TASK_MODULE, data_root=str(CACHE), max_tasks_per_worker=1, warm_up=False
    ),
    "fresh worker per task (spawn)": PoolSettings(
        task_module=TASK_MODULE, data_root=str(CACHE), max_tasks_per_worker=1, start_method="spawn"
    ),
}


def chain(runner: TaskRunner, source: Path, out: Path) -> None:
    raw = fanout.ingest(runner, str(source), out / "raw.parquet")
    runner.run("inspect", path=raw.facts["path"])
    rep = fanout.reproject(runner, raw.facts["path"], out / "rep.parquet", "EPSG:4326")
    runner.run("inspect", path=rep.facts["path"], expected_crs="EPSG:4326")
    dis = fanout.dissolve(runner, rep.facts["path"], out / "dis.parquet", dissolve_by="region_id")
    runner.run("inspect", path=dis.facts["path"], unique_key="region_id", geometries="all")


def measure(settings: PoolSettings, repeats: int, source: Path, out: Path) -> dict[str, float]:
    timings: dict[str, list[float]] = {"noop": [], "chain": [], "start": []}
    for _ in range(3):
        started = time.perf_counter()
        with WorkerPool(settings) as pool:
            pool.run("environment")
        timings["start"].append(time.perf_counter() - started)
    with WorkerPool(settings) as pool:
        runner = TaskRunner(pool)
        pool.run("environment")  # the pool's own start is paid once per run, not per task
        for _ in range(repeats):
            started = time.perf_counter()
            pool.run("environment")
            timings["noop"].append(time.perf_counter() - started)
            started = time.perf_counter()
            chain(runner, source, out)
            timings["chain"].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    source, _ = dataset(10_000)
    results = {}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for label, settings in CONFIGS.items():
            results[label] = measure(settings, args.repeats, source, Path(tmp))
    base = results["workers reused within the pool (the default)"]
    print(f"medians of {args.repeats}; two workers; the 10k chain is 6 tasks")
    print(
        f"{'configuration':<48}{'pool start':>12}{'no-op task':>12}{'10k chain':>12}"
        f"{'overhead':>11}{'per task':>10}{'of chain':>10}"
    )
    for label, r in results.items():
        overhead = r["chain"] - base["chain"]
        print(
            f"{label:<48}{r['start'] * 1000:>10.1f}ms{r['noop'] * 1000:>10.1f}ms"
            f"{r['chain'] * 1000:>10.1f}ms"
            f"{overhead * 1000:>9.1f}ms{overhead / 6 * 1000:>8.1f}ms{overhead / r['chain']:>9.1%}"
        )


if __name__ == "__main__":
    with recorded("isolation"):
        main()
