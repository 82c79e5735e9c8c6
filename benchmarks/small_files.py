"""Many small files: N files dropped at once into the inbox of a real `dagster dev`,
against a plain loop over the same files, side by side in one run.

    .venv/bin/python -m benchmarks.small_files [--files 500] [--bad 0] [--deployment]

  loop     the plain recipe (benchmarks/recipe.py) through a fresh process pool per file
           (the seed's wrapper: ProcessPoolExecutor(max_workers=1) with the forkserver
           start method, so that no worker inherits the caller's GDAL state), two files
           at a time, in one interpreter. The same loop with the `fork` start method (a
           worker is a copy of a parent that already loaded GDAL, which this project
           exists to avoid) is printed too, for reference.
  project  the files copied into the inbox (temp name, then rename) of `dagster dev`
           with the sensor at settle 2 s, interval 5 s; timed from the drop to the last
           dissolved output published. Every file must succeed and be a partition with
           its three materializations.

  deployment  (with --deployment) the same drop into the inbox of the production topology,
           `scripts/stack.sh up` (Postgres, code server, webserver, daemon, every run in
           its own container of geoiso-dagster:latest, built first); its run start is
           the container's start.

With --bad K, K unreadable files are dropped among them (not given to the loop): each
must fail alone, named with its cause, while every good file still succeeds.

Prints files per minute of each and the ratio, where the project's time went (sensor,
queue, run start, pool start, steps, the workers' task time, events), and the memory of
the run processes. Results also go to benchmarks/results/small-files-<time>.json.
"""

import argparse
import collections
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import geopandas
import psutil
import pyogrio
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
)
from dagster._core.storage.event_log.base import AssetRecordsFilter

from benchmarks.results import recorded
from tests.harness.live import DagsterDev, report_check_events

NATURAL_EARTH = (
    Path(pyogrio.__file__).parent / "tests/fixtures/naturalearth_lowres/naturalearth_lowres.shp"
)
REPO = Path(__file__).resolve().parent.parent
SENSOR = {"GEOISO_INBOX_SETTLE_S": "2", "GEOISO_INBOX_INTERVAL_S": "5"}


def make_files(folder: Path, n: int) -> list[Path]:
    """n GeoPackages of about 25 countries each (every 7th of Natural Earth's 177)."""
    countries = geopandas.read_file(NATURAL_EARTH)
    countries["region_id"] = countries["continent"]
    sources = []
    for i in range(n):
        path = folder / f"small_{i:04d}.gpkg"
        countries.iloc[i % 7 :: 7].to_file(path, layer="countries")
        sources.append(path)
    return sources


def loop(sources: list[Path], work: Path, start_method: str) -> float:
    """Seconds the plain loop took, in its own interpreter (benchmarks/recipe.py)."""
    work.mkdir()
    command = [sys.executable, "-m", "benchmarks.recipe", "--start-method", start_method]
    done = subprocess.run(
        [*command, "--out", str(work), *map(str, sources)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    assert len(list(work.glob("*.geojson"))) == len(sources), "the loop lost files"
    return float(done.stdout.split()[-1])


class ProcessWatch:
    """Every process of the server's session, sampled every 0.2 s: the peak RSS of each
    run process (a child of the code server) and of each pool process (a run's
    forkserver and workers), the peak of all of them together, and the CPU seconds each
    kind of process used (its last sample: a process's own time is gone once it exits)."""

    KINDS = ("dagster dev", "webserver", "daemon", "code server", "run", "pool")

    def __init__(self, server: DagsterDev) -> None:
        self.server = server
        self.peak: dict[str, dict[int, float]] = {"run": {}, "pool": {}}
        self.cpu: dict[int, tuple[str, float]] = {}
        self.together_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _kind(cmd: str, parent: int, code_servers: set[int]) -> str:
        if "dagster_webserver" in cmd:
            return "webserver"
        if "dagster._daemon" in cmd:
            return "daemon"
        if "api grpc" in cmd or "code-server" in cmd:
            return "code server"
        if " dev " in cmd:
            return "dagster dev"
        return "run" if parent in code_servers else "pool"

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            seen = []
            for proc in self.server.processes():
                try:
                    seen.append((proc, " ".join(proc.cmdline()), proc.ppid()))
                except psutil.Error:
                    continue
            code_servers = {proc.pid for proc, cmd, _ in seen if "api grpc" in cmd}
            together = 0.0
            for proc, cmd, parent in seen:
                kind = self._kind(cmd, parent, code_servers)
                try:
                    rss = proc.memory_info().rss / 2**20
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                self.cpu[proc.pid] = (kind, times.user + times.system)
                if kind in self.peak:
                    self.peak[kind][proc.pid] = max(self.peak[kind].get(proc.pid, 0.0), rss)
                    together += rss
            self.together_peak = max(self.together_peak, together)

    def cpu_by_kind(self) -> dict[str, float]:
        totals = dict.fromkeys(self.KINDS, 0.0)
        for kind, seconds in self.cpu.values():
            totals[kind] += seconds
        return totals

    def __enter__(self) -> "ProcessWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _drop_and_wait(instance: DagsterInstance, data_root: Path, sources: list, bad: list):
    """Drop every file into the inbox at once (temp name, then rename), then wait for every
    dissolved output and every run to finish. Returns the drop's start and end, the
    outputs, and when the last one was published."""
    inbox = data_root / "inbox"
    dropped = time.time()
    for path in sorted([*sources, *bad]):
        shutil.copy(path, inbox / f".{path.name}.part")
        (inbox / f".{path.name}.part").rename(inbox / path.name)
    dropped_done = time.time()
    outputs = [data_root / "warehouse/dissolved_regions" / f"{p.name}.parquet" for p in sources]
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        runs = instance.get_runs()
        if all(o.exists() for o in outputs) and runs and all(r.is_finished for r in runs):
            break
        time.sleep(0.5)
    last_output = max(o.stat().st_mtime for o in outputs if o.exists())
    return dropped, dropped_done, outputs, last_output


def project(sources: list[Path], root: Path, bad: list[Path]) -> dict:
    inbox = root / "data" / "inbox"
    inbox.mkdir(parents=True)
    server = DagsterDev(root / "home", root / "data", root / "dev.log", **SENSOR).start()
    try:
        with ProcessWatch(server) as watch:
            instance = DagsterInstance.from_config(str(root / "home"))
            dropped, dropped_done, outputs, last_output = _drop_and_wait(
                instance, root / "data", sources, bad
            )
        report = _split(instance, dropped, sources)
        report["bad_files"] = _bad_files(instance, root / "data", bad)
        report.update(
            elapsed_s=last_output - dropped,
            drop_s=dropped_done - dropped,
            outputs=sum(o.exists() for o in outputs),
            run_process_peak_mb=max(watch.peak["run"].values(), default=0.0),
            run_processes=len(watch.peak["run"]),
            pool_process_peak_mb=max(watch.peak["pool"].values(), default=0.0),
            runs_and_pools_together_peak_mb=watch.together_peak,
            cpu_s=watch.cpu_by_kind(),
        )
    finally:
        alive = server.stop()
    report["left_running"] = len(alive)
    return report


def deployment(sources: list[Path], root: Path) -> dict:
    """The drop into the inbox of scripts/stack.sh's stack (a container per run)."""
    import os

    from tests.harness.deploy import DockerEngine, Stack

    root.mkdir(parents=True)
    for folder in (root.parent, root):  # the benchmark's temp folder, then this one:
        folder.chmod(0o711)  # the Postgres cluster inside belongs to `nobody` as root
    engine = DockerEngine(root).start()
    image_s = engine.build_image()
    stack = Stack(root / "stack", root / "data", **SENSOR)
    try:
        started = time.monotonic()
        stack.script("up")
        up_s = time.monotonic() - started
        os.environ.update(stack.instance_env)
        instance = DagsterInstance.get()
        dropped, _, outputs, last_output = _drop_and_wait(instance, root / "data", sources, [])
        report = _split(instance, dropped, sources)
        report.update(
            elapsed_s=last_output - dropped,
            outputs=sum(o.exists() for o in outputs),
            stack_up_s=up_s,
            image_s=image_s,
        )
    finally:
        stack.script("down")
        engine.stop()
    return report


def _all(fetch) -> list:
    """Every record of a paged fetch (the instance gives at most 10,000 at a time)."""
    records, cursor = [], None
    while True:
        page = fetch(cursor)
        records.extend(page.records)
        if not page.has_more:
            return records
        cursor = page.cursor


def _event_write_ms(instance: DagsterInstance, n: int = 100) -> float:
    """What writing one asset event costs on this instance, measured after the run: a
    check result for a partition, as a step writes it (without the step around it)."""
    started = time.perf_counter()
    report_check_events(instance, "event_write_probe", "p", n)
    return (time.perf_counter() - started) / n * 1000


def _bad_files(instance: DagsterInstance, data_root: Path, bad: list[Path]) -> dict:
    """How the bad files ended: no output anywhere, named with a cause by one failed run."""
    failures = [
        record.event_log_entry.dagster_event.step_failure_data.user_failure_data
        for run in instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
        for record in instance.get_records_for_run(
            run.run_id, of_type=DagsterEventType.STEP_FAILURE
        ).records
    ]
    named = {}
    for path in bad:
        named[path.name] = [
            f.metadata["failed_files"].value[path.name]
            for f in failures
            if f and "failed_files" in f.metadata and path.name in f.metadata["failed_files"].value
        ]
    return {
        "outputs_left": sum(1 for p in bad for _ in data_root.glob(f"warehouse/*/{p.name}.*")),
        "failed_runs": len(failures),
        "causes": named,
        "remainder_runs": len(
            instance.get_runs(
                filters=RunsFilter(tags={"dagster/sensor_name": "batch_remainder_sensor"})
            )
        ),
    }


def _split(instance: DagsterInstance, dropped: float, sources: list[Path]) -> dict:
    """Where the project's time went, from the instance's own records."""
    runs = instance.get_run_records(filters=RunsFilter())
    rows = []
    for record in runs:
        stats = instance.get_run_stats(record.dagster_run.run_id)
        steps = instance.get_run_step_stats(record.dagster_run.run_id)
        events = _all(lambda c, run=record.dagster_run.run_id: instance.get_records_for_run(run, c))
        first_step = min((s.start_time for s in steps if s.start_time), default=stats.start_time)
        rows.append(
            {
                "files": int(record.dagster_run.tags.get("geoiso/batch_files", "1")),
                "status": record.dagster_run.status.value,
                "created": record.create_timestamp.timestamp(),
                "launched": stats.launch_time,
                "started": stats.start_time,
                "first_step": first_step,
                "ended": stats.end_time,
                "steps_s": sum((s.end_time or 0) - (s.start_time or 0) for s in steps),
                "events": len(events),
                "events_by_type": collections.Counter(
                    r.event_log_entry.dagster_event.event_type_value
                    if r.event_log_entry.is_dagster_event
                    else "log message"
                    for r in events
                ),
            }
        )
    work_s = 0.0
    for name in ("raw_features", "reprojected_features", "dissolved_regions"):
        key = AssetKey(name)
        records = _all(
            lambda c, key=key: instance.fetch_materializations(
                AssetRecordsFilter(asset_key=key), limit=5000, cursor=c
            )
        )
        work_s += sum(r.asset_materialization.metadata["duration_s"].value for r in records)
        if name == "dissolved_regions":
            partitions = {r.asset_materialization.partition for r in records}
    ok = [r for r in rows if r["status"] == "SUCCESS"]
    event_ms = _event_write_ms(instance)
    return {
        "runs": len(rows),
        "runs_succeeded": len(ok),
        "files_per_run": statistics.median(r["files"] for r in rows),
        "partitions_dissolved": len(partitions & {p.name for p in sources}),
        "sensor_first_run_s": min(r["created"] for r in rows) - dropped,
        "sensor_last_run_s": max(r["created"] for r in rows) - dropped,
        "queue_s_median": statistics.median(r["launched"] - r["created"] for r in rows),
        "run_start_s_median": statistics.median(r["started"] - r["launched"] for r in rows),
        "pool_start_s_median": statistics.median(r["first_step"] - r["started"] for r in rows),
        "steps_s_total": sum(r["steps_s"] for r in rows),
        "worker_task_s_total": work_s,
        "events_total": sum(r["events"] for r in rows),
        "events_by_type": dict(sum((r["events_by_type"] for r in rows), collections.Counter())),
        "event_write_ms": event_ms,
        "runs_s_total": sum(r["ended"] - r["launched"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument(
        "--bad", type=int, default=0, help="bad files dropped among them (not in the loop)"
    )
    parser.add_argument(
        "--deployment",
        action="store_true",
        help="also through scripts/stack.sh (Postgres, a container per run)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "sources").mkdir()
        sources = make_files(root / "sources", args.files)
        loop_s = loop(sources, root / "loop", "forkserver")
        fork_s = loop(sources, root / "loop-fork", "fork")
        bad = []
        for i in range(args.bad):
            path = root / "sources" / f"small_{(i + 1) * args.files // (args.bad + 1):04d}_bad.gpkg"
            path.write_bytes(b"not a GeoPackage" * 64)
            bad.append(path)
        result = project(sources, root / "project", bad)
        deployed = deployment(sources, root / "deployment") if args.deployment else None
    n = args.files
    rate = {
        "loop": n / loop_s * 60,
        "fork": n / fork_s * 60,
        "project": n / result["elapsed_s"] * 60,
    }
    print(f"\n{n} small files (about 25 countries each), files per minute:")
    print(f"  plain loop (fresh forkserver pool per file, 2 at a time) {rate['loop']:8.1f}")
    print(
        f"  project through dagster dev and its sensor               {rate['project']:8.1f}"
        f"   {rate['project'] / rate['loop']:.2f}x the loop"
    )
    print(
        f"  (reference: the loop with fork, unsafe for GDAL state    {rate['fork']:8.1f}"
        f"   project {rate['project'] / rate['fork']:.2f}x)"
    )
    r = result
    print(
        f"\nproject: {r['outputs']} of {n} dissolved outputs in {r['elapsed_s']:.1f} s from the "
        f"drop (copying the files in took {r['drop_s']:.1f} s); {r['runs']} runs "
        f"({r['runs_succeeded']} succeeded), median {r['files_per_run']:g} files a run; "
        f"{r['partitions_dissolved']} partitions with a dissolved materialization"
    )
    print(
        f"time split: sensor (drop to first / last run created) {r['sensor_first_run_s']:.1f} / "
        f"{r['sensor_last_run_s']:.1f} s; per run (median) queue {r['queue_s_median']:.1f} s, "
        f"run start {r['run_start_s_median']:.1f} s, pool start and plan "
        f"{r['pool_start_s_median']:.1f} s; all runs {r['runs_s_total']:.1f} run-seconds, "
        f"of which steps {r['steps_s_total']:.1f} s, the workers' tasks "
        f"{r['worker_task_s_total']:.1f} worker-seconds (two workers a run); "
        f"{r['events_total']} events written ({r['events_total'] / n:.1f} a file; one asset "
        f"event costs {r['event_write_ms']:.1f} ms on this instance, measured after the run)"
    )
    kinds = sorted(r["events_by_type"].items(), key=lambda kv: -kv[1])
    print("events by type: " + ", ".join(f"{kind} {count}" for kind, count in kinds[:6]))
    print(
        f"memory: run process peak {r['run_process_peak_mb']:.0f} MB ({r['run_processes']} run "
        f"processes), pool process (forkserver, worker) peak {r['pool_process_peak_mb']:.0f} MB, "
        f"runs and pools together at most {r['runs_and_pools_together_peak_mb']:.0f} MB; left "
        f"running after stop: {r['left_running']}"
    )
    print(
        "CPU seconds by process: "
        + ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in r["cpu_s"].items())
        + f" (2 cores x {r['elapsed_s']:.0f} s = {2 * r['elapsed_s']:.0f} available)"
    )
    if bad:
        b = r["bad_files"]
        print(
            f"bad files: {len(bad)} dropped among them; {b['failed_runs']} failed runs, "
            f"{b['remainder_runs']} remainder runs, {b['outputs_left']} outputs of theirs; "
            f"causes named: {b['causes']}"
        )
    if deployed:
        d = deployed
        rate["deployment"] = n / d["elapsed_s"] * 60
        print(
            f"\ndeployment (scripts/stack.sh: Postgres, a container per run): "
            f"{rate['deployment']:.1f} files per minute, {rate['deployment'] / rate['loop']:.2f}x "
            f"the loop, {rate['deployment'] / rate['project']:.2f}x dagster dev; "
            f"{d['outputs']} of {n} outputs in {d['elapsed_s']:.1f} s; {d['runs']} runs "
            f"({d['runs_succeeded']} succeeded), median {d['files_per_run']:g} files a run; "
            f"run start (the container's start to the run process's first event) median "
            f"{d['run_start_s_median']:.1f} s against {r['run_start_s_median']:.1f} s for a "
            f"child process; queue {d['queue_s_median']:.1f} s; pool start and plan "
            f"{d['pool_start_s_median']:.1f} s; stack.sh up {d['stack_up_s']:.1f} s, "
            f"make image {d['image_s']:.0f} s"
        )
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    report = {"files": n, "files_per_minute": rate, "project": result, "loop_s": loop_s}
    report["deployment"] = deployed
    (out / f"small-files-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(report, indent=2)
    )


if __name__ == "__main__":
    with recorded("small_files"):
        main()
