"""Load: 20 files dropped into the inbox at once with the daemon running, plus two
concurrent CLI runs of one partition. Every file is materialized exactly once per
change, outputs equal a serial run's, no Parquet is corrupt, and the workers stay
within max_workers per run."""

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from unittest import mock

import geopandas
import psutil
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from geoiso_dagster.defs.assets import ASSET_NAMES
from geoiso_dagster.paths import output_path
from geoiso_dagster.spatial import tasks
from tests.harness.live import BIN, FAST_INBOX, DagsterDev, covered_partitions, materialize_command

FILES = 20
MAX_WORKERS = 2
CEILING_MB = 1024
GEO_RUNS_AT_ONCE = 2  # dagster.yaml: pool default_limit
CLI_RUNS = 2
SIDE_CAR = {"target_crs": "EPSG:6933"}


def _make_sources(folder: Path, naturalearth_shp: Path) -> dict[str, Path]:
    countries = geopandas.read_file(naturalearth_shp)
    countries["region_id"] = countries["continent"]
    sources = {}
    for i in range(FILES):
        part = countries.iloc[i::FILES]
        path = folder / f"batch_{i:02d}.gpkg"
        part.to_file(path, layer="countries")
        if i % 4 == 0:
            (folder / f"{path.name}.geoiso.json").write_text(json.dumps(SIDE_CAR))
        sources[path.name] = path
    return sources


def _serial(source: Path, work: Path, target_crs: str) -> Path:
    """The reference: the same steps in this process, with the test's folder (staging and
    work both under it) as the data root the source must stay in."""
    root = os.path.commonpath([source, work])
    with mock.patch.dict(os.environ, {"GEOISO_DATA_ROOT": root}):
        raw = tasks.ingest(str(source), str(work / f"{source.name}.raw.parquet"))
        rep = tasks.reproject(raw["path"], str(work / f"{source.name}.rep.parquet"), target_crs)
        dis = tasks.dissolve(rep["path"], str(work / f"{source.name}.dis.parquet"), "region_id")
    return Path(dis["path"])


class WorkerSampler(threading.Thread):
    """Samples the forkserver children (the workers) of every run, every 0.1 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_count, self.peak_rss_mb, self.samples = 0, 0.0, 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            workers = []
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if "multiprocessing.forkserver" in " ".join(p.info["cmdline"] or []):
                        workers += p.children()
                except psutil.Error:
                    continue
            rss = 0
            for w in workers:
                try:
                    rss += w.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_count = max(self.peak_count, len(workers))
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
            self.samples += 1
            time.sleep(0.1)

    def stop(self):
        self._halt.set()
        self.join()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("instance_setup", ["sqlite", "postgres"], indirect=True)
def test_twenty_files_at_once_and_two_cli_runs_of_one_partition(
    tmp_path, naturalearth_shp, instance_setup, monkeypatch
):
    instance_yaml, instance_env = instance_setup
    for name, value in instance_env.items():  # this process opens the instance too
        monkeypatch.setenv(name, value)
    data_root, home = tmp_path / "data", tmp_path / "home"
    (data_root / "inbox").mkdir(parents=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    sources = _make_sources(staging, naturalearth_shp)
    pool_env = {
        "GEOISO_POOL_MAX_WORKERS": str(MAX_WORKERS),
        "GEOISO_POOL_MEMORY_LIMIT_MB": str(CEILING_MB),
        **FAST_INBOX,
    }
    server = DagsterDev(
        home, data_root, tmp_path / "dagster-dev.log", instance_yaml, **pool_env, **instance_env
    ).start()
    sampler = WorkerSampler()
    sampler.start()
    try:
        # Drop all files at once: sidecars first, each file renamed into place whole.
        inbox = data_root / "inbox"
        for path in staging.glob("*.geoiso.json"):
            shutil.copy(path, inbox / path.name)
        for name, path in sources.items():
            shutil.copy(path, inbox / f".{name}.part")
        for name in sources:
            os.rename(inbox / f".{name}.part", inbox / name)

        # Meanwhile, two CLI runs of one more partition, at the same time.
        shared = staging / "shared.gpkg"
        shutil.copy(sources["batch_00.gpkg"], shared)
        cli_env = {**server.env}
        key = subprocess.run(
            [BIN / "geoiso", "add", str(shared)],
            env=cli_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        command = materialize_command(key)
        cli = [
            subprocess.Popen(
                command, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            for _ in range(CLI_RUNS)
        ]

        # `geoiso add` puts shared.gpkg into the inbox too: the sensor runs it as well,
        # so three runs of that partition overlap.
        expected = sorted([*sources, key])
        instance = DagsterInstance.from_config(str(home))
        sensor_runs = RunsFilter(tags={"dagster/sensor_name": "inbox_sensor"})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            runs = instance.get_runs(filters=sensor_runs)
            done = [
                key
                for r in runs
                if r.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)
                for key in covered_partitions(instance, r)
            ]
            if len(done) >= len(expected):
                break
            time.sleep(2)
        for proc in cli:
            assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]

        runs = instance.get_runs(filters=sensor_runs)
        assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), [
            (r.tags.get("dagster/partition"), r.status) for r in runs
        ]
        by_partition = sorted(k for r in runs for k in covered_partitions(instance, r))
        assert by_partition == expected, "every file exactly once"
        assert len(runs) < len(expected), "small files travel in batches"

        # One file changes: exactly one more run, for it alone.
        before = len(runs)
        changed = inbox / "batch_03.gpkg"
        shutil.copy(sources["batch_04.gpkg"], staging / "next.gpkg")
        os.replace(staging / "next.gpkg", changed)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            runs = instance.get_runs(filters=sensor_runs)
            if len(runs) > before and all(r.status == DagsterRunStatus.SUCCESS for r in runs):
                break
            time.sleep(2)
        time.sleep(12)  # two more sensor ticks: nothing else may be requested
        runs = instance.get_runs(filters=sensor_runs)
        assert len(runs) == before + 1
        assert runs[0].tags["dagster/partition"] == "batch_03.gpkg"  # newest first
    finally:
        try:
            sampler.stop()
        finally:
            leftovers = server.stop()
    assert leftovers == [], f"processes left after stopping dagster dev: {leftovers}"

    # Outputs identical to a serial, in-process run of the same steps.
    serial_dir = tmp_path / "serial"
    serial_dir.mkdir()
    expected_sources = {**sources, "batch_03.gpkg": sources["batch_04.gpkg"], key: shared}
    for name, source in expected_sources.items():
        for asset in ASSET_NAMES:
            pq.read_table(output_path(asset, name, data_root)).validate(full=True)
        target = (
            SIDE_CAR["target_crs"] if (staging / f"{name}.geoiso.json").exists() else "EPSG:4326"
        )
        expected = pq.read_table(_serial(source, serial_dir, target))
        actual = pq.read_table(output_path("dissolved_regions", name, data_root))
        assert actual.equals(expected), name
    assert list((data_root / "warehouse").rglob(".*")) == []

    # Workers: never more than max_workers per run, nor more memory than their ceilings.
    runs_at_once = GEO_RUNS_AT_ONCE + CLI_RUNS
    assert sampler.samples > 50
    assert 0 < sampler.peak_count <= runs_at_once * MAX_WORKERS
    assert sampler.peak_rss_mb <= runs_at_once * MAX_WORKERS * CEILING_MB
    print(
        f"load: {FILES} files + {CLI_RUNS} concurrent CLI runs; peak {sampler.peak_count} "
        f"workers, {sampler.peak_rss_mb:.0f} MB RSS"
    )
