"""What the kernel's sandbox around every task costs (pool/sandbox.py, docs/security.md).

    .venv/bin/python -m benchmarks.sandbox [--repeats 12]

The same work as benchmarks/isolation.py (a no-op task; the three steps on the
10,000-polygon GeoPackage, each read back: six tasks), through a real WorkerPool of two
workers, with the sandbox off (the baseline) and on (each task forked by its worker
into a process that confines itself), and a fresh worker per task with it on. Also
what a whole pool costs to start. Prints medians and the overhead against the baseline
of the same run; the 1M chain and the small-files benchmark with it on are
`benchmarks.run` and `benchmarks.small_files` (on is the default: GEOISO_POOL_SANDBOX).
"""

import argparse
import tempfile
from pathlib import Path

from benchmarks.data import CACHE, dataset
from benchmarks.isolation import measure
from benchmarks.results import recorded
from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.pool import PoolSettings

BASE = "sandbox off, workers reused"
CONFIGS = {
    BASE: PoolSettings(task_module=TASK_MODULE, data_root=str(CACHE), sandbox="off"),
    "sandbox on, workers reused (the default)": PoolSettings(
        task_module=TASK_MODULE, data_root=str(CACHE), sandbox="on"
    ),
    "sandbox on, fresh worker per task": PoolSettings(
        task_module=TASK_MODULE, data_root=str(CACHE), sandbox="on", max_tasks_per_worker=1
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    source, _ = dataset(10_000)
    results = {}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for label, settings in CONFIGS.items():
            results[label] = measure(settings, args.repeats, source, Path(tmp))
    base = results[BASE]
    print(f"medians of {args.repeats}; two workers; the 10k chain is 6 tasks")
    print(
        f"{'configuration':<44}{'pool start':>12}{'no-op task':>12}{'10k chain':>12}"
        f"{'per task':>11}{'chain ratio':>13}"
    )
    for label, r in results.items():
        per_task = (r["chain"] - base["chain"]) / 6
        print(
            f"{label:<44}{r['start'] * 1000:>10.1f}ms{r['noop'] * 1000:>10.1f}ms"
            f"{r['chain'] * 1000:>10.1f}ms{per_task * 1000:>9.1f}ms"
            f"{r['chain'] / base['chain']:>12.3f}x"
        )


if __name__ == "__main__":
    with recorded("sandbox"):
        main()
