"""Many small files: N files dropped into the inbox of a real `dagster dev`, each run
by the sensor through the three assets. Reports files per minute and where the time of
a run goes (Dagster's run overhead vs the steps' work vs the workers' task time).

    .venv/bin/python -m benchmarks.small_files [--files 50]
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import geopandas
import pyogrio
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from tests.live import FAST_INBOX, DagsterDev

NATURAL_EARTH = (
    Path(pyogrio.__file__).parent / "tests/fixtures/naturalearth_lowres/naturalearth_lowres.shp"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data" / "inbox").mkdir(parents=True)
        countries = geopandas.read_file(NATURAL_EARTH)
        countries["region_id"] = countries["continent"]
        sources = []
        for i in range(args.files):
            path = root / f"small_{i:03d}.gpkg"
            countries.iloc[i % 7 :: 7].to_file(path, layer="countries")
            sources.append(path)
        server = DagsterDev(
            root / "home",
            root / "data",
            root / "dev.log",
            **FAST_INBOX,
        ).start()
        try:
            started = time.monotonic()
            for path in sources:
                shutil.copy(path, root / "data" / "inbox" / f".{path.name}.part")
                os.rename(
                    root / "data" / "inbox" / f".{path.name}.part",
                    root / "data" / "inbox" / path.name,
                )
            instance = DagsterInstance.from_config(str(root / "home"))
            runs_filter = RunsFilter(tags={"dagster/sensor_name": "inbox_sensor"})
            while time.monotonic() - started < 1800:
                runs = instance.get_runs(filters=runs_filter)
                finished = [r for r in runs if r.is_finished]
                if len(finished) == args.files:
                    break
                time.sleep(1)
            elapsed = time.monotonic() - started
            runs = instance.get_runs(filters=runs_filter)
            ok = sum(r.status == DagsterRunStatus.SUCCESS for r in runs)
            run_s, step_s = [], []
            for run in runs:
                stats = instance.get_run_stats(run.run_id)
                run_s.append(stats.end_time - stats.launch_time)
                steps = instance.get_run_step_stats(run.run_id)
                step_s.append(sum(s.end_time - s.start_time for s in steps))
        finally:
            server.stop()
    print(
        f"{args.files} small files (about 25 countries each) through the sensor: "
        f"{ok} succeeded in {elapsed:.0f} s -> {args.files / elapsed * 60:.1f} files/minute"
    )
    print(
        f"per run (median): launch to end {statistics.median(run_s):.1f} s, of which the three "
        f"steps {statistics.median(step_s):.1f} s; the rest "
        f"({statistics.median(run_s) - statistics.median(step_s):.1f} s) is Dagster's: run "
        "process start, code load, event writes"
    )


if __name__ == "__main__":
    main()
