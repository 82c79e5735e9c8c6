"""Faults injected into real workers during real Dagster runs (GEOISO_FAULTS hook).

After each: the previous good output intact, no temp file left that a later run could
mistake for output, no orphan process, retries exactly as the failure table says, and
the next run succeeds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    instance_for_test,
    materialize,
)

from geoiso_dagster import dataroot
from geoiso_dagster.defs import reconcile
from geoiso_dagster.defs.assets import ASSET_NAMES, geo_assets
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import TASK_MODULE, SpatialWorkerPool
from geoiso_dagster.paths import output_path
from tests.harness.live import materialize_command
from tests.harness.runs import retries, run_events

KEY = "countries.gpkg"
CONFIG = {"ops": {"dissolved_regions": {"config": {"dissolve_by": "continent"}}}}
EXPECTED_ROWS = {"raw_features": 177, "reprojected_features": 177, "dissolved_regions": 8}


def _descendants() -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                continue  # one per process, exits with it, runs no task
        except psutil.NoSuchProcess:
            continue
        found.append(p)
    return found


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(source_files.name, [KEY])
        yield instance


@pytest.fixture
def good_outputs(instance, data_root):
    shutil.copy("data/sample/countries.gpkg", data_root / "inbox" / KEY)
    assert _run(instance).success
    return {a: output_path(a, KEY).read_bytes() for a in ASSET_NAMES}


def _run(instance, **pool):
    return materialize(
        geo_assets,
        instance=instance,
        partition_key=KEY,
        run_config=CONFIG,
        resources={"spatial_pool": SpatialWorkerPool(max_workers=2, **pool)},
        raise_on_error=False,
    )


def _inject(monkeypatch, tmp_path, task, at, fault, times) -> Path:
    state = tmp_path / "fault-state"
    spec = {"task": task, "at": at, "fault": fault, "times": times, "state": str(state)}
    monkeypatch.setenv("GEOISO_FAULTS", json.dumps([spec]))
    return state


def _temps(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "warehouse").rglob(".*"))


def _assert_outputs_good(root: Path) -> None:
    for asset, rows in EXPECTED_ROWS.items():
        assert pq.ParquetFile(output_path(asset, KEY, root)).metadata.num_rows == rows


RECOVERS = [
    ("reproject", "write", "sigkill", {}),
    ("dissolve", "start", "abort", {}),
    ("ingest", "start", "hang", {"task_timeout_s": 3.0}),
    ("ingest", "write", "enospc", {}),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("task", "at", "fault", "pool"), RECOVERS, ids=[r[2] for r in RECOVERS])
def test_a_transient_fault_is_retried_once_and_the_run_succeeds(
    task, at, fault, pool, instance, good_outputs, data_root, monkeypatch, tmp_path
):
    state = _inject(monkeypatch, tmp_path, task, at, fault, times=1)
    result = _run(instance, **pool)
    assert len(list(state.glob("fired-*"))) == 1, "the fault did not fire"
    assert result.success
    assert len(retries(instance, result)) == 1
    _assert_outputs_good(data_root)
    assert _temps(data_root) == []
    assert _descendants() == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("task", "at", "fault", "message"),
    [
        ("reproject", "write", "sigkill", "killed by SIGKILL"),
        ("ingest", "write", "enospc", "File too large"),
    ],
)
def test_a_persistent_fault_gives_up_after_three_attempts_and_loses_nothing(
    task, at, fault, message, instance, good_outputs, data_root, monkeypatch, tmp_path
):
    _inject(monkeypatch, tmp_path, task, at, fault, times=3)
    result = _run(instance)
    assert not result.success
    waits = retries(instance, result)
    assert len(waits) == 2
    assert all(5 <= wait <= 60 for wait in waits)
    (failure,) = run_events(result, DagsterEventType.STEP_FAILURE)
    description = failure.step_failure_data.user_failure_data.description
    assert message in description and "attempt 3 of 3" in description
    assert {a: output_path(a, KEY).read_bytes() for a in ASSET_NAMES} == good_outputs
    assert _temps(data_root) == []
    assert _descendants() == []

    monkeypatch.delenv("GEOISO_FAULTS")
    assert _run(instance).success
    _assert_outputs_good(data_root)


@pytest.mark.parametrize(
    ("task", "at", "fault", "limit", "expected"),
    [
        ("dissolve", "start", "memory", 700, ["memory_limit_mb=700", "MB of memory"]),
        ("ingest", "write", "enomem", 1024, ["Cannot allocate memory", "memory_limit_mb=1024"]),
    ],
    ids=["over the ceiling", "out of address space"],
)
def test_a_memory_stop_fails_once_naming_the_limit(
    task, at, fault, limit, expected, instance, good_outputs, data_root, monkeypatch, tmp_path
):
    """Over the ceiling, or out of address space (Arrow's "Cannot allocate memory" under
    the RLIMIT_AS backstop): the worker's memory, not the input's fault; not retried."""
    _inject(monkeypatch, tmp_path, task, at, fault, times=1)
    result = _run(instance, memory_limit_mb=limit)
    assert not result.success
    assert retries(instance, result) == []
    (failure,) = run_events(result, DagsterEventType.STEP_FAILURE)
    description = failure.step_failure_data.user_failure_data.description
    assert "Bad input" not in description
    assert all(text in description for text in expected), description
    asset = {"dissolve": "dissolved_regions", "ingest": "raw_features"}[task]
    assert output_path(asset, KEY).read_bytes() == good_outputs[asset]
    assert _temps(data_root) == []
    assert _descendants() == []


_KILL = {"fault": "sigkill", "times": 1}
# The other part, cancelled, ignores SIGTERM, goes on after 1 s and renames its part file
# before pebble, which waits 3 s after SIGTERM, kills it: the cancel must wait for that.
_LINGER = {"task": "reproject", "at": "start", "fault": "linger", "seconds": 1.0, "times": 1}
KILL_MOMENTS = [
    ("a part, while the other part works", [{"task": "reproject", "at": "start", **_KILL}]),
    (
        "a part, while the other part lingers past its cancel",
        [{"task": "reproject", "at": "start", **_KILL}, _LINGER],
    ),
    ("a part, half its file on disk", [{"task": "reproject", "at": "write", **_KILL}]),
    ("the join, half its file on disk", [{"task": "concatenate", "at": "write", **_KILL}]),
    ("the read-back of the joined file", [{"task": "inspect", "at": "start", **_KILL}]),
]


@pytest.fixture(scope="module")
def squares_gpkg(tmp_path_factory) -> Path:
    """120,001 squares (three row groups): with fan-out on, each step runs in two parts."""
    import geopandas
    import numpy as np
    import shapely

    n = 120_001
    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 1e5, (2, n))
    frame = geopandas.GeoDataFrame(
        {"region_id": np.arange(n) % 50},
        geometry=shapely.box(corners[0], corners[1], corners[0] + 10, corners[1] + 10),
        crs=3035,
    )
    path = tmp_path_factory.mktemp("squares") / "squares.gpkg"
    frame.to_file(path, driver="GPKG", engine="pyogrio")
    return path


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("moment", "faults"), KILL_MOMENTS, ids=[m[0] for m in KILL_MOMENTS])
def test_a_worker_killed_at_any_moment_of_a_fanned_out_step_leaves_no_stray_file(
    moment, faults, data_root, squares_gpkg, monkeypatch, tmp_path
):
    """A worker SIGKILLed during a part (the other part is cancelled and waited for),
    during the join or during the read-back: the step is retried once and succeeds, its
    output equals the output of a run without the fault, and the warehouse holds nothing
    but the published files: every failed attempt's staged output and parts are gone."""
    from geoiso_dagster.defs import fanout

    monkeypatch.setattr(fanout, "FAN_OUT_MIN_ROWS", 1)
    key = "squares.gpkg"
    shutil.copy(squares_gpkg, data_root / "inbox" / key)
    config = {"ops": {"reprojected_features": {"config": {"target_crs": "EPSG:4326"}}}}
    steps = [a for a in geo_assets if a.key.to_user_string() != "dissolved_regions"]

    def run(instance):
        return materialize(
            steps,
            instance=instance,
            partition_key=key,
            run_config=config,
            resources={"spatial_pool": SpatialWorkerPool(max_workers=2)},
            raise_on_error=False,
        )

    with instance_for_test() as instance:
        instance.add_dynamic_partitions(source_files.name, [key])
        assert run(instance).success
        clean = pq.read_table(output_path("reprojected_features", key))
        output_path("reprojected_features", key).unlink()
        state = tmp_path / "fault-state"
        monkeypatch.setenv(
            "GEOISO_FAULTS", json.dumps([{**f, "state": str(state)} for f in faults])
        )
        result = run(instance)
        logged = [e.user_message for e in instance.all_logs(result.run_id)]
        waits = retries(instance, result)
    assert len(list(state.glob("fired-*"))) == len(faults), "a fault did not fire"
    assert result.success
    assert len(waits) == 1
    assert any("killed by SIGKILL; attempt 1 of 3" in m for m in logged), moment
    (mat,) = result.asset_materializations_for_node("reprojected_features")
    assert mat.metadata["fanned_out_over"].value == 2
    assert pq.read_table(output_path("reprojected_features", key)).equals(clean)
    assert _temps(data_root) == []
    assert _descendants() == []


def _start_with_a_hung_dissolve(command: list, env: dict, state: Path) -> subprocess.Popen:
    """Start `command` with the first dissolve hanging in its write; return once it hangs."""
    faults = [{"task": "dissolve", "at": "write", "fault": "hang", "times": 1, "state": str(state)}]
    run = subprocess.Popen(
        command,
        env={**env, "GEOISO_FAULTS": json.dumps(faults)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 150
    while not list(state.glob("hanging-*")) and time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before the fault fired"
        time.sleep(0.2)
    run.hung_workers = [psutil.Process(int(p.name.split("-")[1])) for p in state.glob("hanging-*")]
    return run


def _kill_and_expect_no_orphans(run: subprocess.Popen) -> None:
    """SIGKILL the run process; its workers (the hung one too) must all die."""
    everything = psutil.Process(run.pid).children(recursive=True) + run.hung_workers
    run.send_signal(signal.SIGKILL)
    run.wait()
    _, alive = psutil.wait_procs(everything, timeout=10)
    assert alive == [], f"orphans after the run process was killed: {alive}"


def test_run_process_killed_mid_write_then_run_again(data_root, tmp_path):
    """SIGKILL the `dagster asset materialize` process while a worker is writing; its
    workers must die, the published outputs stay as they were, and the next run sweeps
    the dead run's temp files and succeeds."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEOISO_DATA_ROOT": str(data_root)}
    shutil.copy("data/sample/countries.gpkg", tmp_path / KEY)
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "geoiso", "add", str(tmp_path / KEY)], env=env, check=True)
    command = materialize_command(KEY, CONFIG)
    assert subprocess.run(command, env=env, capture_output=True, timeout=180).returncode == 0
    good = {a: output_path(a, KEY, data_root).read_bytes() for a in ASSET_NAMES}

    run = _start_with_a_hung_dissolve(command, env, tmp_path / "fault-state")
    assert _temps(data_root), "the hung worker should have a temp file on disk"
    _kill_and_expect_no_orphans(run)

    assert {a: output_path(a, KEY, data_root).read_bytes() for a in ASSET_NAMES} == {
        **good,
        # raw and reprojected were republished by the killed run before dissolve began;
        # they are complete files (rename is atomic), so compare content, not bytes.
        "raw_features": output_path("raw_features", KEY, data_root).read_bytes(),
        "reprojected_features": output_path("reprojected_features", KEY, data_root).read_bytes(),
    }
    _assert_outputs_good(data_root)

    assert subprocess.run(command, env=env, capture_output=True, timeout=180).returncode == 0
    _assert_outputs_good(data_root)
    assert _temps(data_root) == []


@pytest.mark.timeout(240)
def test_batch_run_killed_mid_step_keeps_what_it_published(data_root, tmp_path):
    """A batch run (a range of three partitions) is SIGKILLed while one file's dissolve
    hangs: the steps it finished stay published and recorded for every file, nothing of
    the unfinished step is visible, no process is left, and running the batch again
    sweeps the dead run's temp files and succeeds."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEOISO_DATA_ROOT": str(data_root)}
    keys = ["k1.gpkg", "k2.gpkg", "k3.gpkg"]
    for key in keys:
        shutil.copy("data/sample/countries.gpkg", tmp_path / key)
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [bin_dir / "geoiso", "add", *[str(tmp_path / k) for k in keys]], env=env, check=True
    )
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    command = [
        bin_dir / "dagster", "job", "execute", "-m", "geoiso_dagster.definitions",
        "-j", "geo_pipeline", "-c", str(config), "--tags",
        json.dumps({"dagster/asset_partition_range_start": keys[0],
                    "dagster/asset_partition_range_end": keys[-1]}),
    ]  # fmt: skip
    run = _start_with_a_hung_dissolve(command, env, tmp_path / "fault-state")
    time.sleep(2)  # the other files' dissolves finish (staged, not yet published)
    _kill_and_expect_no_orphans(run)

    for key in keys:
        for asset in ("raw_features", "reprojected_features"):
            assert pq.ParquetFile(output_path(asset, key, data_root)).metadata.num_rows == 177
        assert not output_path("dissolved_regions", key, data_root).exists()
    with DagsterInstance.from_config(str(home)) as instance:
        recorded = {
            (r.asset_key.to_user_string(), r.partition_key)
            for asset in ASSET_NAMES
            for r in instance.fetch_materializations(AssetKey(asset), limit=100).records
        }
    assert recorded == {(a, k) for a in ("raw_features", "reprojected_features") for k in keys}

    assert subprocess.run(command, env=env, capture_output=True, timeout=180).returncode == 0
    for key in keys:
        assert (
            pq.ParquetFile(output_path("dissolved_regions", key, data_root)).metadata.num_rows == 8
        )
    assert _temps(data_root) == []


def test_a_full_disk_while_reproject_copies_is_transient(data_root, monkeypatch, tmp_path):
    """reproject copies a file already in the target CRS; a full disk there is the same
    transient fault as in the transform path, not a task error."""
    import geopandas
    import shapely

    from geoiso_dagster.errors import TransientIOError
    from geoiso_dagster.pool import PoolSettings, WorkerPool

    source = data_root / "warehouse" / "raw_features" / "squares.parquet"
    source.parent.mkdir(parents=True, exist_ok=True)
    squares = [shapely.box(i, 0, i + 1, 1) for i in range(2000)]
    geopandas.GeoDataFrame({"n": range(2000)}, geometry=squares, crs=4326).to_parquet(source)
    output = data_root / "warehouse" / "reprojected_features" / "squares.parquet"
    output.parent.mkdir(parents=True, exist_ok=True)
    _inject(monkeypatch, tmp_path, "reproject", "write", "enospc", times=1)
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=1)) as pool:
        with pytest.raises(TransientIOError, match="File too large"):
            pool.run("reproject", source=str(source), output=str(output), target_crs="EPSG:4326")
        facts = pool.run(
            "reproject", source=str(source), output=str(output), target_crs="EPSG:4326"
        ).facts
    assert facts["transformed"] is False and facts["rows"] == 2000
    assert _temps(data_root) == []


def test_an_armed_fault_fires_only_while_its_file_exists(tmp_path, monkeypatch):
    """The Docker OOM test sets its fault for the whole stack and arms it for one run."""
    import json

    from geoiso_dagster.spatial import faults

    armed = tmp_path / "armed"
    fault = {"task": "ingest", "fault": "enomem", "state": str(tmp_path), "armed": str(armed)}
    monkeypatch.setenv(faults.FAULTS_ENV, json.dumps([fault]))
    faults.at_start("ingest")  # not armed: nothing happens
    armed.touch()
    with pytest.raises(OSError, match="Cannot allocate memory"):
        faults.at_start("ingest")
    faults.at_start("ingest")  # "times" defaults to 1: it fired once


def _reproject_only(instance):
    return materialize(
        geo_assets,
        instance=instance,
        partition_key=KEY,
        selection=["reprojected_features"],
        resources={"spatial_pool": SpatialWorkerPool(max_workers=2)},
    )


def _raw_record(instance) -> dict:
    result = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("raw_features"), asset_partitions=[KEY]), limit=1
    )
    return dict(result.records[0].asset_materialization.metadata)


@pytest.mark.parametrize("recorded_before", [True, False], ids=["stale-record", "no-record"])
def test_a_file_published_but_never_recorded_is_recorded_by_the_next_run(
    instance, data_root, recorded_before
):
    """A run killed between publishing a file and recording it leaves the catalog
    describing the previous file (or, a batch, no record at all). The next run that reads
    or writes the file finds its stamp in no record, records it as found (rows from its
    footer), marked repaired, and says so; the catalog and the files agree again."""
    shutil.copy("data/sample/countries.gpkg", data_root / "inbox" / KEY)
    raw = output_path("raw_features", KEY)
    if recorded_before:
        assert _run(instance).success
        assert _raw_record(instance)[reconcile.PUBLISHED_AS].value == dataroot.root().stamp(raw)
    else:
        raw.parent.mkdir(parents=True)
        shutil.copy("data/sample/countries.gpkg", data_root / "inbox" / "other.gpkg")
        instance.add_dynamic_partitions(source_files.name, ["other.gpkg"])
        materialize(
            geo_assets,
            instance=instance,
            partition_key="other.gpkg",
            selection=["raw_features"],
            resources={"spatial_pool": SpatialWorkerPool(max_workers=2)},
        )
        shutil.copy(output_path("raw_features", "other.gpkg"), raw)  # published, unrecorded
    # What the killed run left: another file in place (50 rows), published atomically.
    table = pq.read_table(raw)
    staged = raw.with_name(".staged")
    pq.write_table(table.slice(0, 50).replace_schema_metadata(table.schema.metadata), staged)
    os.replace(staged, raw)
    an_hour_ago = time.time() - 3600  # published by a run that died then (no live run
    os.utime(raw, (an_hour_ago, an_hour_ago))  # records so late: reconcile.RECORD_GRACE_S)
    result = _reproject_only(instance)
    assert result.success
    record = _raw_record(instance)
    assert record["dagster/row_count"].value == 50
    assert record[reconcile.PUBLISHED_AS].value == dataroot.root().stamp(raw)
    assert "recorded by run " + result.run_id in record[reconcile.REPAIRED].value
    logged = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(
        "raw_features countries.gpkg: the catalog disagreed with the file" in m for m in logged
    )
    assert pq.ParquetFile(output_path("reprojected_features", KEY)).metadata.num_rows == 50
    again = _reproject_only(instance)
    logged = [e.user_message for e in instance.all_logs(again.run_id)]
    assert not any("disagreed" in m for m in logged), "repaired twice"


@pytest.mark.timeout(300)
def test_an_instance_whose_disk_fills_mid_run_publishes_nothing(data_root, tmp_path):
    """The instance's disk fills while the run works (a worker fills it: the `fill`
    fault, in a mount namespace of the test's own where DAGSTER_HOME is a small tmpfs):
    the run fails before anything is published (files were published and never
    recorded); once there is room again, the next run publishes and records them."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy("data/sample/countries.gpkg", tmp_path / KEY)
    fault = {
        "task": "ingest",
        "fault": "fill",
        "path": str(home / "filler"),
        "state": str(tmp_path / "fault-state"),
    }
    command = " ".join(f"'{part}'" for part in materialize_command(KEY, CONFIG))
    geoiso = Path(sys.executable).parent / "geoiso"
    script = f"""
        mount -t tmpfs -o size=48m tmpfs {home} && cp deploy/local/dagster.yaml {home}/ &&
        {geoiso} add {tmp_path / KEY} >/dev/null &&
        GEOISO_FAULTS='{json.dumps([fault])}' {command} >{tmp_path}/first.log 2>&1
        echo first=$?
        test -e {output_path("raw_features", KEY, data_root)} && echo published-while-full
        rm -f {home}/filler
        {command} >{tmp_path}/second.log 2>&1
        echo second=$?
    """
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEOISO_DATA_ROOT": str(data_root)}
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    first = (tmp_path / "first.log").read_text()
    assert "first=0" not in result.stdout and "first=" in result.stdout, result.stdout
    assert any(s in first for s in ("disk is full", "No space left", "disk I/O error")), first[
        -3000:
    ]
    assert "published-while-full" not in result.stdout
    assert "second=0" in result.stdout, (tmp_path / "second.log").read_text()[-3000:]
    _assert_outputs_good(data_root)
    assert _temps(data_root) == []
