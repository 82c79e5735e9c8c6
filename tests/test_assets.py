"""The assets in a real Dagster run (materialize, in process) with real worker pools."""

import re
import shutil
import socket

import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    asset,
    instance_for_test,
    materialize,
)

from geoiso_dagster.defs.assets import ASSET_NAMES, geo_assets
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.retries import MAX_WAIT_S, MIN_WAIT_S
from geoiso_dagster.defs.steps import spec_of
from geoiso_dagster.paths import output_path
from tests.harness.runs import retries, run_batch, run_events

# What each built-in asset's blocking check judges, as its spec says.
CRITERIA_BY_ASSET = {spec_of(a).name: spec_of(a).criteria for a in geo_assets}
CONFIG = {
    "ops": {
        "reprojected_features": {"config": {"target_crs": "EPSG:6933"}},
        "dissolved_regions": {"config": {"dissolve_by": "continent"}},
    }
}


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


def _run(instance: DagsterInstance, key: str, config=CONFIG, **pool):
    if not instance.has_dynamic_partition(source_files.name, key):
        instance.add_dynamic_partitions(source_files.name, [key])
    return materialize(
        geo_assets,
        instance=instance,
        partition_key=key,
        run_config=config,
        resources={"spatial_pool": SpatialWorkerPool.fixed(max_workers=2, **pool)},
        raise_on_error=False,
    )


def _failure(result):
    """(step key, description) of the run's one step failure."""
    (failure,) = run_events(result, DagsterEventType.STEP_FAILURE)
    return failure.step_key, failure.step_failure_data.user_failure_data.description


def _snapshot(root, key):
    return {a: output_path(a, key, root).read_bytes() for a in ASSET_NAMES}


def _leftover_temps(root):
    return sorted(p.name for p in (root / "warehouse").rglob(".*"))


@pytest.fixture
def countries(data_root):
    shutil.copy("data/sample/countries.gpkg", data_root / "inbox" / "countries.gpkg")
    return "countries.gpkg"


def test_three_assets_with_metadata_and_passed_checks(instance, data_root, countries):
    result = _run(instance, countries)
    assert result.success
    for name in ASSET_NAMES:
        (mat,) = result.asset_materializations_for_node(name)
        md = mat.metadata
        assert md["path"].value == str(output_path(name, countries, data_root))
        assert md["dagster/uri"].value.startswith("file://")
        rows = pq.ParquetFile(md["path"].value).metadata.num_rows
        assert md["dagster/row_count"].value == rows == (8 if name == "dissolved_regions" else 177)
        columns = {c.name for c in md["dagster/column_schema"].schema.columns}
        assert "geometry" in columns and "continent" in columns
        assert md["crs"].value == ("EPSG:4326" if name == "raw_features" else "EPSG:6933")
        for key in (
            "bbox",
            "geometry_types",
            "bytes",
            "duration_s",
            "worker_peak_rss_mb",
            "worker_pid",
            "gdal_version",
            "geos_version",
            "proj_version",
        ):
            assert key in md, key
        assert md["worker_peak_rss_mb"].value > 50
        assert md["worker_host"].value == socket.gethostname()  # no container here
    checks = result.get_asset_check_evaluations()
    assert len(checks) == len(CRITERIA_BY_ASSET) == 3  # one per asset, for this file
    assert all(c.passed for c in checks)
    for check in checks:
        names = CRITERIA_BY_ASSET[check.asset_key.to_user_string()]
        assert [n for n in names if check.metadata[n].value["passed"]] == list(names)
    assert _leftover_temps(data_root) == []


def test_bad_input_fails_once_and_keeps_the_good_output(
    instance, data_root, countries, naturalearth_shp, copy_shapefile
):
    assert _run(instance, countries).success
    good = _snapshot(data_root, countries)
    # Same partition key, new content: a GeoPackage that is not one.
    (data_root / "inbox" / countries).write_bytes(b"SQLite format 3\x00 but truncated")
    result = _run(instance, countries)
    assert not result.success
    _, message = _failure(result)
    assert str(data_root / "inbox" / countries) in message
    assert "cannot be read as a GeoPackage (SQLite: file is not a database)" in message
    assert retries(instance, result) == []
    assert result.asset_materializations_for_node("reprojected_features") == []
    assert _snapshot(data_root, countries) == good
    assert _leftover_temps(data_root) == []


def test_no_crs_is_a_clear_failure(instance, data_root, naturalearth_shp, copy_shapefile):
    shp = copy_shapefile(naturalearth_shp, data_root / "inbox", skip=(".prj",))
    result = _run(instance, shp.name)
    assert not result.success
    assert "no coordinate reference system" in _failure(result)[1]
    assert not output_path("raw_features", shp.name, data_root).exists()


def test_missing_dissolve_key_fails_only_the_dissolve(instance, data_root, countries):
    assert _run(instance, countries).success
    good = _snapshot(data_root, countries)
    config = {"ops": {"dissolved_regions": {"config": {"dissolve_by": "region_id"}}}}
    result = _run(instance, countries, config=config)
    assert not result.success
    assert len(result.asset_materializations_for_node("reprojected_features")) == 1
    step, message = _failure(result)
    assert step == "dissolved_regions"
    assert "'region_id' is not in the data" in message
    assert retries(instance, result) == []
    assert (
        output_path("dissolved_regions", countries, data_root).read_bytes()
        == good["dissolved_regions"]
    )


def test_failed_blocking_check_stops_downstream_and_publishes_nothing(
    instance, data_root, countries
):
    assert _run(instance, countries).success
    good = _snapshot(data_root, countries)
    result = _run(instance, countries, task_module="tests.standins.lying_inspect")
    assert not result.success
    failed = [c for c in result.get_asset_check_evaluations() if not c.passed]
    # The file holds one row fewer than the step said, and than the source declares.
    assert [(c.asset_key, c.check_name) for c in failed] == [
        (AssetKey("raw_features"), "integrity")
    ]
    assert failed[0].metadata["failed"].value == "row_count_matches, counts_match_source"
    seen = failed[0].metadata["row_count_matches"].value
    assert seen["passed"] is False and seen["in_file"] == seen["reported"] + 1 == 178
    assert result.asset_materializations_for_node("raw_features") == []
    started = {e.step_key for e in run_events(result, DagsterEventType.STEP_START)}
    assert started == {"raw_features"}  # nothing downstream ran on the failed output
    assert _snapshot(data_root, countries) == good
    assert _leftover_temps(data_root) == []


@pytest.mark.timeout(120)
def test_hung_worker_is_retried_with_backoff_then_fails(instance, data_root, countries):
    result = _run(
        instance, countries, task_module="tests.standins.hanging_ingest", task_timeout_s=1.0
    )
    assert not result.success
    waits = retries(instance, result)
    assert len(waits) == 2
    for wait in waits:
        assert MIN_WAIT_S <= wait <= MAX_WAIT_S
    _, message = _failure(result)
    assert "task_timeout_s=1" in message and "attempt 3 of 3" in message
    assert not output_path("raw_features", countries, data_root).exists()


def test_an_async_asset_can_fan_tasks_out(instance, data_root, countries):
    import asyncio

    @asset
    async def two_views(spatial_pool: SpatialWorkerPool) -> None:
        a, b = await asyncio.gather(
            spatial_pool.run_async("sleep", seconds=0.5),
            spatial_pool.run_async("sleep", seconds=0.5),
        )
        assert a.pid != b.pid  # side by side, in two workers
        assert max(a.facts["started"], b.facts["started"]) < min(a.facts["ended"], b.facts["ended"])
        env = await spatial_pool.run_async("environment")
        assert env.facts["env"]["GDAL_NUM_THREADS"] == "1"

    result = materialize(
        [two_views],
        instance=instance,
        resources={
            "spatial_pool": SpatialWorkerPool.fixed(task_module="tests.standins.pool_tasks")
        },
    )
    assert result.success


def test_progress_reaches_the_run_log_while_the_worker_works(instance):
    from dagster import AssetExecutionContext

    from geoiso_dagster.defs.runner import TaskRunner

    @asset
    def slow(context: AssetExecutionContext, spatial_pool: SpatialWorkerPool) -> None:
        TaskRunner(spatial_pool.pool, context.log.info).run("slow_progress", seconds=2.0)

    result = materialize(
        [slow],
        instance=instance,
        resources={
            "spatial_pool": SpatialWorkerPool.fixed(task_module="tests.standins.pool_tasks")
        },
    )
    logs = instance.all_logs(result.run_id)
    (message,) = [e for e in logs if e.user_message == "started the slow part"]
    (success,) = [
        e
        for e in logs
        if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_SUCCESS
    ]
    assert success.timestamp - message.timestamp > 1.5, "progress arrived only at the end"


def test_the_real_steps_say_what_they_do(instance, data_root, countries):
    result = _run(instance, countries)
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(m.startswith("read and wrote 177 features from countries.gpkg") for m in messages)
    assert any(m.startswith("reprojected 177 features to EPSG:6933") for m in messages)
    assert any(m.startswith("dissolved 177 features into 8 groups") for m in messages)
    (mat,) = result.asset_materializations_for_node("dissolved_regions")
    assert mat.metadata["map"].value.startswith("![8 regions](data:image/png;base64,")


def test_a_batch_run_logs_what_each_files_tasks_say(instance, data_root, monkeypatch):
    """A run over a range of partitions (a sensor's batch, a backfill) says for every
    file what a one-file run says (its tasks' messages, its fan-out notes), each line
    named by its file, in the run's own log: a step's lines together, in one message
    every few seconds (here, with the interval longer than the run, one a step), not one
    database write a line."""
    import geopandas
    import numpy as np
    import shapely

    from geoiso_dagster.definitions import defs
    from geoiso_dagster.defs import batch, fanout

    monkeypatch.setattr(batch, "_BATCH_LOG_EVERY_S", 3600.0)

    keys = ["a.gpkg", "b.gpkg", "c.parquet"]
    for key in keys[:2]:
        shutil.copy("data/sample/countries.gpkg", data_root / "inbox" / key)
    n = 60_001  # two row groups: with fan-out on, its steps run in two parts
    corners = np.random.default_rng(3).uniform(0, 1e5, (2, n))
    squares = shapely.box(corners[0], corners[1], corners[0] + 10, corners[1] + 10)
    geopandas.GeoDataFrame({"continent": np.arange(n) % 5}, geometry=squares, crs=3035).to_parquet(
        data_root / "inbox" / keys[2], row_group_size=50_000
    )
    monkeypatch.setattr(fanout, "FAN_OUT_MIN_ROWS", 1)
    instance.add_dynamic_partitions(source_files.name, keys)
    result = run_batch(defs.resolve_job_def("geo_pipeline"), instance, keys, CONFIG)
    assert result.success
    said = [e for e in instance.all_logs(result.run_id) if e.step_key and not e.dagster_event]
    by_step = {step: [e.user_message for e in said if e.step_key == step] for step in ASSET_NAMES}
    for step, logged in by_step.items():  # the lines, then the step's own summary
        assert len(logged) == 2 and logged[1].startswith(f"{step}: 3 of 3 files made in "), logged
    messages = [line for e in said for line in e.user_message.splitlines()]
    for key in keys[:2]:
        for said in (
            f"{key}: read and wrote 177 features from {key}",
            f"{key}: reprojected 177 features to EPSG:6933",
            f"{key}: dissolving 8 groups in 2 parts",  # a fan-out note
        ):
            assert any(m.startswith(said) for m in messages), said
    assert any(m.startswith("c.parquet: fanning out over 2 workers: ") for m in messages)
    parts = [m for m in messages if re.match(r"c.parquet: reprojected \d+ features", m)]
    assert sum(int(m.split()[2]) for m in parts) == n and len(parts) == 2, parts


def test_large_steps_fan_out_and_equal_the_single_task_results(instance, data_root, monkeypatch):
    import geopandas
    import numpy as np
    import shapely

    from geoiso_dagster.defs import fanout

    n = 120_001  # row groups of at most 50,000
    rng = np.random.default_rng(5)
    squares = shapely.box(
        *(rng.uniform(0, 1e5, (2, n)) + [[0], [0]]), *(rng.uniform(0, 1e5, (2, n)) + 10)
    )
    frame = geopandas.GeoDataFrame({"region_id": np.arange(n) % 50}, geometry=squares, crs=3035)
    frame.to_file(data_root / "inbox" / "many.gpkg", driver="GPKG", engine="pyogrio")
    config = {"ops": {"reprojected_features": {"config": {"target_crs": "EPSG:4326"}}}}
    key = "many.gpkg"

    monkeypatch.setattr(fanout, "FAN_OUT_MIN_ROWS", 10**9)
    assert _run(instance, key, config=config).success
    single = {a: pq.read_table(output_path(a, key)) for a in ASSET_NAMES}

    monkeypatch.setattr(fanout, "FAN_OUT_MIN_ROWS", 1)
    monkeypatch.setattr(fanout, "FAN_OUT_MIN_BYTES", 0)
    result = _run(instance, key, config=config)
    assert result.success
    for name in ASSET_NAMES:  # each step in two parts side by side, then joined
        (mat,) = result.asset_materializations_for_node(name)
        assert mat.metadata["fanned_out_over"].value == 2, name
        assert pq.read_table(output_path(name, key)).equals(single[name]), name
    (dissolved,) = result.asset_materializations_for_node("dissolved_regions")
    assert dissolved.metadata["dagster/row_count"].value == 50
    for name in ("raw_features", "reprojected_features"):  # parts merged in Hilbert order
        metadata = pq.ParquetFile(output_path(name, key)).metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        # bounded, and cut where the curve leaves a quadtree cell: 35,000 to 50,000 rows
        assert max(sizes) <= 50_000 and min(sizes[:-1]) >= 35_000, (name, sizes)
        assert sum(sizes) == n, name
    assert _leftover_temps(data_root) == []


def test_a_ceiling_below_the_whole_frame_need_still_materializes(instance, data_root):
    """The whole-frame pipeline (read it all, to_crs, make_valid, dissolve) on 200,000
    polygons is measured in a worker; the assets then run with every worker's ceiling at
    three quarters of that need, which stops the whole-frame pipeline, and succeed with
    every region's area equal to the whole-frame one."""
    import geopandas

    from benchmarks.ceiling import whole_frame
    from benchmarks.data import dataset

    source, _ = dataset(200_000)
    shutil.copy(source, data_root / "inbox" / "cells.gpkg")
    need, areas = whole_frame(source, memory_limit_mb=8192)
    limit = int(need * 0.75)
    refused, none = whole_frame(source, memory_limit_mb=limit)
    assert none is None and "over its ceiling" in refused

    config = {"ops": {"reprojected_features": {"config": {"target_crs": "EPSG:4326"}}}}
    result = _run(instance, "cells.gpkg", config=config, memory_limit_mb=limit)
    assert result.success
    for name in ASSET_NAMES:
        (mat,) = result.asset_materializations_for_node(name)
        assert mat.metadata["fanned_out_over"].value == 2, name
        assert mat.metadata["worker_peak_rss_mb"].value < limit, name
    out = geopandas.read_parquet(output_path("dissolved_regions", "cells.gpkg"))
    got = dict(zip(out["region_id"].astype(str), out.geometry.area, strict=True))
    assert got.keys() == areas.keys()
    for key, area in areas.items():
        assert got[key] == pytest.approx(area, rel=1e-9), key


def test_a_long_step_says_how_far_it_is_at_regular_intervals(instance, monkeypatch):
    """Every STATUS_EVERY_S (5 s in production; 0.3 s here), a line per running task:
    rows done of total, the rate, the time left.

    The step polls every 0.25 s, so a line comes every 0.5 s here: a 4 s task gives
    about 8, and 4 are asked for. (With 2 s, about 4 came, and a slow first poll once
    left 3: the margin was nil.)"""
    from dagster import AssetExecutionContext

    from geoiso_dagster.defs import runner

    monkeypatch.setattr(runner, "STATUS_EVERY_S", 0.3)

    @asset
    def long_step(context: AssetExecutionContext, spatial_pool: SpatialWorkerPool) -> None:
        runner.TaskRunner(spatial_pool.pool, context.log.info).run(
            "counting_progress", total=10_000, seconds=4.0
        )

    result = materialize(
        [long_step],
        instance=instance,
        resources={
            "spatial_pool": SpatialWorkerPool.fixed(task_module="tests.standins.pool_tasks")
        },
    )
    assert result.success
    lines = [
        e
        for e in instance.all_logs(result.run_id)
        if e.user_message.startswith("counting_progress: ")
    ]
    assert len(lines) >= 4, [e.user_message for e in lines]
    gaps = [b.timestamp - a.timestamp for a, b in zip(lines, lines[1:], strict=False)]
    assert max(gaps) < 1.0, gaps
    last = lines[-1].user_message
    assert " of 10,000 (" in last and " rows/s, about " in last and " s left" in last, last


def test_run_config_cannot_choose_the_workers_module_or_environment(instance):
    """Task references and the workers' environment are fixed when the definitions are
    built: run config (the launchpad, a sensor's run request) naming either is refused
    before any step runs, and setting the fields it may set leaves them as built."""
    from dagster import DagsterInvalidConfigError

    from geoiso_dagster.definitions import defs
    from geoiso_dagster.defs.runner import TaskRunner

    job = defs.resolve_job_def("geo_pipeline")  # the code location's own job and resource
    instance.add_dynamic_partitions(source_files.name, ["x.gpkg"])
    for field, value in (
        ("task_module", "tests.standins.pool_tasks"),
        ("worker_env", {"LD_PRELOAD": "/tmp/evil.so", "GEOISO_DATA_ROOT": "/"}),
    ):
        refused = {"resources": {"spatial_pool": {"config": {field: value}}}}
        with pytest.raises(DagsterInvalidConfigError, match=field):
            job.execute_in_process(run_config=refused, instance=instance, partition_key="x.gpkg")

    @asset
    def probe(context, spatial_pool: SpatialWorkerPool) -> None:
        runner = TaskRunner(spatial_pool.pool, context.log.info)
        facts = runner.run("read_env", name="GEOISO_TEST_MARKER").facts
        context.add_output_metadata(
            {"marker": facts["value"]}
        )  # read_env: tests.standins.pool_tasks
        assert spatial_pool.max_workers == 1

    result = materialize(
        [probe],
        instance=instance,
        run_config={"resources": {"spatial_pool": {"config": {"max_workers": 1}}}},
        resources={
            "spatial_pool": SpatialWorkerPool.fixed(
                task_module="tests.standins.pool_tasks", worker_env={"GEOISO_TEST_MARKER": "built"}
            )
        },
    )
    (materialization,) = result.asset_materializations_for_node("probe")
    assert materialization.metadata["marker"].value == "built"
