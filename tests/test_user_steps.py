"""Steps of a team's own (geo_asset, build_definitions, "module:function" tasks) in real
Dagster runs with real worker pools: the envelope of the built-in steps, for them too."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import geopandas
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from dagster import (
    AssetKey,
    Config,
    DagsterEventType,
    build_run_status_sensor_context,
    build_sensor_context,
    instance_for_test,
)

from geoiso_dagster import Reference, build_definitions, cli, geo_asset
from geoiso_dagster.defs.assets import ReprojectConfig
from geoiso_dagster.defs.outputs import OutputKind
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.errors import (
    BadInputError,
    MemoryLimitError,
    TaskError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from geoiso_dagster.paths import output_path, reference_dir
from geoiso_dagster.pool import PoolSettings, WorkerPool
from geoiso_dagster.spatial import io
from tests.harness.grids import grid
from tests.harness.runs import failure_of, retries, run_batch, run_events

KEY = "countries.gpkg"


class AreaConfig(Config):
    equal_area_crs: str = "EPSG:6933"


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def countries(data_root, naturalearth_shp):
    frame = geopandas.read_file(naturalearth_shp)
    frame.to_file(data_root / "inbox" / KEY, driver="GPKG", engine="pyogrio")
    return frame


def _run(instance, extra, key=KEY, run_config=None, selection=None):
    """The code location's own job, built with `extra`, over one partition (the assets
    named in `selection` only, when given)."""
    instance.add_dynamic_partitions(source_files.name, [key])
    job = build_definitions(extra).resolve_job_def("geo_pipeline")
    ops = {"dissolved_regions": {"config": {"dissolve_by": "continent"}}}
    ops.update((run_config or {}).get("ops", {}))
    return job.execute_in_process(
        instance=instance,
        partition_key=key,
        run_config={"ops": {k: v for k, v in ops.items() if k in (selection or ops)}},
        raise_on_error=False,
        asset_selection=[AssetKey(name) for name in selection] if selection else None,
    )


def test_a_step_of_your_own_gets_the_envelope_of_the_built_in_ones(instance, countries):
    areas = geo_asset(
        "country_areas",
        task="tests.standins.user_steps:area_km2",
        upstream="reprojected_features",
        config=AreaConfig,
    )
    result = _run(instance, [areas])
    assert result.success
    written = geopandas.read_parquet(output_path("country_areas", KEY))
    expected = countries.to_crs(6933).area.to_numpy() / 1e6  # independent of the step
    assert len(written) == 177 and written.crs.to_epsg() == 4326
    assert np.allclose(
        np.sort(written["area_km2"].to_numpy()), np.sort(expected), rtol=1e-9, atol=1e-6
    )
    (mat,) = result.asset_materializations_for_node("country_areas")
    metadata = mat.metadata
    assert metadata["dagster/row_count"].value == 177
    assert metadata["crs"].value == "EPSG:4326"
    assert metadata["largest_km2"].value == pytest.approx(expected.max())  # the task's fact
    assert metadata["worker_host"].value and metadata["worker_pid"].value > 0
    assert "area_km2" in [c.name for c in metadata["dagster/column_schema"].schema.columns]
    (check,) = [
        e.asset_check_evaluation_data
        for e in run_events(result, DagsterEventType.ASSET_CHECK_EVALUATION)
        if e.asset_check_evaluation_data.asset_key.to_user_string() == "country_areas"
    ]
    assert check.passed and check.blocking
    judged = {k for k in check.metadata if k != "failed"}
    assert judged == {
        "readable_geoparquet",
        "row_count_matches",
        "crs_matches_target",
        "coordinates_in_crs_range",
    }
    assert areas.automation_conditions_by_key[areas.key] is not None  # after upstream checks
    logged = [e.message for e in instance.all_logs(result.run_id)]
    assert any("measuring 177 features" in (m or "") for m in logged)  # progress()


def test_a_plain_to_parquet_step_works_on_a_fresh_data_root(instance, countries, data_root):
    """A function written to the contract with geopandas alone (`frame.to_parquet(output)`)
    on a root whose warehouse has no folder for the new asset yet: the envelope prepares
    the output's folder, as it does for the built-in writers."""
    plain = geo_asset(
        "plain_copy", task="tests.standins.user_steps:plain_to_parquet", upstream="raw_features"
    )
    assert not (data_root / "warehouse" / "plain_copy").exists()
    result = _run(instance, [plain], selection=["raw_features", "plain_copy"])
    assert result.success, failure_of(result)
    written = geopandas.read_parquet(output_path("plain_copy", KEY))
    assert len(written) == 177 and written.crs.to_epsg() == 4326
    geo = json.loads(pq.read_schema(output_path("plain_copy", KEY)).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and "bbox" in geo["columns"]["geometry"]["covering"]
    logged = [e.message or "" for e in instance.all_logs(result.run_id)]
    assert any("rewrote the step's output as GeoParquet 1.1" in m for m in logged), logged
    assert sorted(p.name for p in (data_root / "warehouse" / "plain_copy").iterdir()) == [
        f"{KEY}.parquet"
    ]


@dataclass(frozen=True)
class FlatGeobufOutput(OutputKind):
    """A second output kind, made here as the raster kind will be: a subclass naming its
    suffix, its worker tasks, its criteria and its catalog entries, with no edit to the
    envelope (defs/outputs.py)."""

    name: str = "flatgeobuf"
    suffix: str = ".fgb"
    read_back: str = "tests.standins.user_steps:inspect_flatgeobuf"
    describe: str = "tests.standins.user_steps:describe_flatgeobuf"
    criteria: dict = field(
        default_factory=lambda: {
            "readable_flatgeobuf": "The file opens with GDAL's FlatGeobuf driver.",
            "row_count_matches": "Rows in the file equal the row count the step reported.",
            "geometries_valid": "Every geometry is valid.",
        }
    )
    default_criteria: tuple = ("readable_flatgeobuf", "row_count_matches")

    def judge(self, criterion, written, seen):
        if criterion == "readable_flatgeobuf":
            return seen["driver"] == "FlatGeobuf", {"driver": seen["driver"]}
        if criterion == "row_count_matches":
            return seen["rows"] == written["rows"], {"in_file": seen["rows"]}
        if criterion == "geometries_valid":
            return seen["valid"] == seen["rows"], {"valid": seen["valid"]}
        return super().judge(criterion, written, seen)

    def catalog(self, facts):
        return {"dagster/row_count": facts["rows"], "fgb_bytes": facts["bytes"]}


def test_a_second_output_kind_goes_through_the_same_envelope(instance, countries, data_root):
    """A FlatGeobuf kind of the test's own: published as <key>.fgb, read back by its own
    task, judged by its own criteria, described by its own catalog entries; a file that
    holds fewer rows than reported is stopped by the blocking check and never published."""
    kind = FlatGeobufOutput()
    as_fgb = geo_asset(
        "as_fgb",
        task="tests.standins.user_steps:to_flatgeobuf",
        upstream="reprojected_features",
        output_kind=kind,
        criteria=("readable_flatgeobuf", "row_count_matches", "geometries_valid"),
    )
    assert as_fgb.specs_by_key[as_fgb.key].kinds == {"flatgeobuf", "geopandas"}
    result = _run(instance, [as_fgb], selection=["raw_features", "reprojected_features", "as_fgb"])
    assert result.success, failure_of(result)
    published = output_path("as_fgb", KEY, suffix=".fgb")
    written = geopandas.read_file(published, engine="pyogrio")
    reprojected = geopandas.read_parquet(output_path("reprojected_features", KEY))
    assert len(written) == len(reprojected) == 177 and written.crs.to_epsg() == 4326
    assert written.to_crs(6933).area.sum() == pytest.approx(reprojected.to_crs(6933).area.sum())
    (mat,) = result.asset_materializations_for_node("as_fgb")
    assert mat.metadata["dagster/row_count"].value == 177
    assert mat.metadata["fgb_bytes"].value == published.stat().st_size
    assert mat.metadata["path"].value == str(published)
    (check,) = [
        e.asset_check_evaluation_data
        for e in run_events(result, DagsterEventType.ASSET_CHECK_EVALUATION)
        if e.asset_check_evaluation_data.asset_key.to_user_string() == "as_fgb"
    ]
    assert check.passed
    assert {k for k in check.metadata if k != "failed"} == set(kind.criteria)
    assert sorted(p.name for p in published.parent.iterdir()) == [f"{KEY}.fgb"]

    short = geo_asset(
        "short_fgb",
        task="tests.standins.user_steps:to_flatgeobuf",
        upstream="reprojected_features",
        output_kind=kind,
        options={"drop": 1},
    )
    result = _run(instance, [short], selection=["short_fgb"])
    assert not result.success
    (check,) = [
        e.asset_check_evaluation_data
        for e in run_events(result, DagsterEventType.ASSET_CHECK_EVALUATION)
        if e.asset_check_evaluation_data.asset_key.to_user_string() == "short_fgb"
    ]
    assert check.metadata["failed"].value == "row_count_matches"
    assert check.metadata["row_count_matches"].value == {"passed": False, "in_file": 176}
    folder = output_path("short_fgb", KEY, suffix=".fgb").parent
    assert list(folder.iterdir()) == []  # neither published nor left staged
    refused = (
        ({"criteria": ("readable_geoparquet",)}, "unknown check criteria"),
        ({"splittable": True}, "cannot be joined"),
    )
    for wrong, why in refused:
        with pytest.raises(ValueError, match=why):
            geo_asset(
                "bad",
                task="tests.standins.user_steps:to_flatgeobuf",
                upstream="raw_features",
                output_kind=kind,
                **wrong,
            )


def test_config_fields_reach_the_function_as_keyword_arguments(instance, countries):
    areas = geo_asset(
        "country_areas",
        task="tests.standins.user_steps:area_km2",
        upstream="raw_features",
        config=AreaConfig,
    )
    config = {"ops": {"country_areas": {"config": {"equal_area_crs": "EPSG:8857"}}}}
    assert _run(instance, [areas], run_config=config).success
    written = geopandas.read_parquet(output_path("country_areas", KEY))
    expected = countries.to_crs(8857).area.sum() / 1e6
    assert written["area_km2"].sum() == pytest.approx(expected, rel=1e-9)


def test_bad_input_raised_by_your_function_fails_once_naming_the_file(instance, countries):
    refusing = geo_asset(
        "big_only", task="tests.standins.user_steps:refuse_small", upstream="raw_features"
    )
    result = _run(instance, [refusing])
    assert not result.success
    text = failure_of(result)
    assert "raw_features/countries.gpkg.parquet: has 177 features, fewer than 1000" in text
    assert not retries(instance, result)
    assert not output_path("big_only", KEY).exists()
    assert output_path("dissolved_regions", KEY).exists()  # the others are not its business


def test_a_function_that_misreports_its_rows_is_stopped_by_the_blocking_check(instance, countries):
    lying = geo_asset(
        "lying", task="tests.standins.user_steps:overstate_rows", upstream="raw_features"
    )
    result = _run(instance, [lying])
    assert not result.success
    (check,) = [
        e.asset_check_evaluation_data
        for e in run_events(result, DagsterEventType.ASSET_CHECK_EVALUATION)
        if e.asset_check_evaluation_data.asset_key.to_user_string() == "lying"
    ]
    assert not check.passed
    assert check.metadata["failed"].value == "row_count_matches"
    assert not output_path("lying", KEY).exists()  # never published
    assert list((output_path("lying", KEY).parent).glob(".*")) == []  # nor left staged


def test_a_function_that_returns_no_dict_is_a_task_error(instance, countries):
    odd = geo_asset("odd", task="tests.standins.user_steps:not_a_dict", upstream="raw_features")
    result = _run(instance, [odd])
    text = failure_of(result)
    assert "returned list, not a dict of facts" in text
    assert not retries(instance, result)


def test_a_splittable_join_fans_out_and_equals_geopandas_on_the_whole_frames(
    instance, data_root, monkeypatch
):
    """120,001 points (3 row groups) joined to 12 zones of a reference layer: in 2 parts
    side by side, each reading the zones its bbox reaches; the same rows as
    geopandas.sjoin of the whole frames."""
    from geoiso_dagster.defs import fanout

    rng = np.random.default_rng(7)
    n = 120_001
    points = geopandas.GeoDataFrame(
        {"point_id": np.arange(n)},
        geometry=shapely.points(rng.uniform(-170, 170, n), rng.uniform(-80, 80, n)),
        crs=4326,
    )
    points.to_file(data_root / "inbox" / "points.gpkg", driver="GPKG", engine="pyogrio")
    zones = grid((-180, -90, 180, 90), 4, 3, crs=4326)
    reference_dir(data_root).mkdir()
    io.write_geoparquet(zones, reference_dir(data_root) / "zones.parquet")
    joined = geo_asset(
        "points_in_zones",
        task="geoiso_dagster.ops:sjoin",
        upstream="raw_features",
        inputs={"right": Reference("zones.parquet")},
        splittable=True,
    )
    monkeypatch.setattr(fanout, "FAN_OUT_MIN_ROWS", 1)
    result = _run(
        instance, [joined], key="points.gpkg", selection=["raw_features", "points_in_zones"]
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("points_in_zones")
    assert mat.metadata["fanned_out_over"].value == 2
    got = geopandas.read_parquet(output_path("points_in_zones", "points.gpkg"))
    expected = geopandas.sjoin(points, zones, predicate="intersects").drop(columns="index_right")
    key = ["point_id", "zone"]
    got = got.sort_values(key).reset_index(drop=True)
    expected = expected.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[key], expected[key])
    assert got.geometry.geom_equals_exact(expected.geometry, tolerance=0).all()
    assert mat.metadata["dagster/row_count"].value == len(expected) >= n
    assert pq.ParquetFile(output_path("points_in_zones", "points.gpkg")).metadata.num_rows == len(
        expected
    )


def test_task_references_and_definitions_are_checked_when_built():
    for task in (
        "tests.standins.user_steps",
        "tests.standins.user_steps:_private",
        "a b:c",
        "x:y.z",
        "ingest",
    ):
        with pytest.raises(ValueError, match="task"):
            geo_asset("bad", task=task, upstream="raw_features")
    with pytest.raises(ValueError, match="needs an upstream asset"):
        geo_asset("bad", task="tests.standins.user_steps:area_km2")
    with pytest.raises(ValueError, match="bad asset name"):
        geo_asset("../escape", task="tests.standins.user_steps:area_km2", upstream="raw_features")
    with pytest.raises(ValueError, match="contains a path separator"):
        Reference("../zones.parquet")
    with pytest.raises(ValueError, match="not a GeoParquet file name"):
        Reference("zones.gpkg")


def test_the_pool_runs_a_function_of_your_own_with_its_guarantees(tmp_path, naturalearth_shp):
    """Progress messages, bad input by kind, the timeout that kills, the memory ceiling,
    a crash named by its signal, a module that is not there."""
    source = tmp_path / "countries.parquet"
    io.write_geoparquet(geopandas.read_file(naturalearth_shp), source)
    settings = PoolSettings(
        task_module=TASK_MODULE, max_workers=1, task_timeout_s=2, memory_limit_mb=300
    )
    with WorkerPool(settings) as pool:
        seen = []
        facts = pool.run(
            "tests.standins.user_steps:area_km2",
            source=str(source),
            output=str(tmp_path / "a.parquet"),
            on_progress=seen.append,
        ).facts
        assert facts["rows"] == 177 and seen[0]["message"] == "measuring 177 features"
        with pytest.raises(BadInputError, match="fewer than 1000"):
            pool.run("tests.standins.user_steps:refuse_small", source=str(source), output="x")
        with pytest.raises(WorkerTimeoutError, match="its worker was killed"):
            pool.run("tests.standins.user_steps:sleep", source=str(source), output="x", seconds=30)
        with pytest.raises(MemoryLimitError, match="over its ceiling memory_limit_mb=300"):
            pool.run("tests.standins.user_steps:hoard", source=str(source), output="x")
        with pytest.raises(WorkerCrashedError, match="killed by SIGSEGV"):
            pool.run("tests.standins.user_steps:crash", source=str(source), output="x")
        with pytest.raises(TaskError, match="No module named 'tests.nowhere'"):
            pool.run("tests.nowhere:step", source=str(source), output="x")
        with pytest.raises(ValueError, match="bad task reference"):
            pool.run("tests.standins.user_steps:area_km2; import os", source=str(source))


def test_a_batch_remainder_makes_a_teams_own_step_too(instance, data_root, naturalearth_shp):
    """A batch run that fails on one file is carried on by the remainder sensor for
    its other files, and a team's own step in the job's group is one of the steps the
    remainder makes (the sensor reads the job's assets, not the built-in three)."""
    frame = geopandas.read_file(naturalearth_shp)
    keys = ["a.gpkg", "b.gpkg", "c.gpkg"]
    for key in ("a.gpkg", "c.gpkg"):
        frame.to_file(data_root / "inbox" / key, driver="GPKG", engine="pyogrio")
    (data_root / "inbox" / "b.gpkg").write_bytes(b"not a GeoPackage" * 64)
    instance.add_dynamic_partitions(source_files.name, keys)
    areas = geo_asset(
        "country_areas", task="tests.standins.user_steps:area_km2", upstream="reprojected_features"
    )
    defs = build_definitions([areas])
    job = defs.resolve_job_def("geo_pipeline")
    config = {"ops": {"dissolved_regions": {"config": {"dissolve_by": "continent"}}}}
    failed = run_batch(job, instance, keys, config)
    assert not failed.success
    assert not output_path("country_areas", "a.gpkg").exists()
    (event,) = run_events(failed, DagsterEventType.PIPELINE_FAILURE)
    sensor = defs.get_sensor_def("batch_remainder_sensor")
    context = build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_event=event,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(failed.run_id),
    )
    requests = sensor(context)
    # b.gpkg lies between them, so each good file gets a remainder run of its own.
    ranges = [
        (r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
        for r in requests
    ]
    assert ranges == [("a.gpkg", "a.gpkg"), ("c.gpkg", "c.gpkg")]
    for request in requests:
        made = [key.to_user_string() for key in request.asset_selection]
        assert made == ["reprojected_features", "dissolved_regions", "country_areas"]
        remainder = job.execute_in_process(
            instance=instance,
            run_config=request.run_config,
            tags=request.tags,
            asset_selection=request.asset_selection,
            raise_on_error=False,
        )
        assert remainder.success
    expected = frame.to_crs(6933).area.sum() / 1e6  # independent of the step
    for key in ("a.gpkg", "c.gpkg"):
        written = geopandas.read_parquet(output_path("country_areas", key))
        assert len(written) == 177
        assert np.isclose(written["area_km2"].sum(), expected, rtol=1e-9)
    assert not output_path("country_areas", "b.gpkg").exists()


def test_a_sidecar_sets_what_the_steps_declare_and_nothing_else(
    instance, data_root, tmp_path, monkeypatch, capsys
):
    """The settings a <file>.geoiso.json may hold come from the assets' specs: a team's
    own step that declares one gets it from the sensor (and from `geoiso add -m`), the
    built-in ones keep theirs, and a name no step declares is refused."""
    monkeypatch.setenv("GEOISO_INBOX_SETTLE_S", "0")
    areas = geo_asset(
        "sidecar_areas",
        task="tests.standins.user_steps:area_km2",
        upstream="reprojected_features",
        config=AreaConfig,
        sidecar=("equal_area_crs",),
    )
    defs = build_definitions([areas])
    sensor = defs.resolve_sensor_def("inbox_sensor")
    inbox = data_root / "inbox"
    sample = (Path("data/sample/countries.gpkg")).read_bytes()
    settings = {"a.gpkg": {"equal_area_crs": "ESRI:54009", "target_crs": "EPSG:3857"}}
    settings["b.gpkg"] = {"equal_area": "ESRI:54009"}
    for name, values in settings.items():
        (inbox / name).write_bytes(sample)
        (inbox / f"{name}.geoiso.json").write_text(json.dumps(values))
    result = sensor(build_sensor_context(instance=instance, definitions=defs))
    (request,) = result.run_requests
    assert request.partition_key == "a.gpkg"
    assert request.run_config == {
        "ops": {
            "sidecar_areas": {"config": {"equal_area_crs": "ESRI:54009"}},
            "reprojected_features": {"config": {"target_crs": "EPSG:3857"}},
        }
    }
    # The built-in code location's sensor does not know the team's setting.
    builtin = build_definitions()
    refused = builtin.resolve_sensor_def("inbox_sensor")(
        build_sensor_context(instance=instance, definitions=builtin)
    )
    assert "unknown settings ['equal_area_crs']" in refused.skip_reason.skip_message
    # `geoiso add -m MODULE` judges a sidecar by that code location's steps.
    location = tmp_path / "team_location"
    location.mkdir()
    (location / "team_defs.py").write_text(
        "from dagster import Config\n"
        "from geoiso_dagster import build_definitions, geo_asset\n"
        "class AreaConfig(Config):\n"
        "    equal_area_crs: str = 'EPSG:6933'\n"
        "defs = build_definitions([geo_asset('sidecar_areas',"
        " task='tests.standins.user_steps:area_km2', upstream='reprojected_features',"
        " config=AreaConfig, sidecar=('equal_area_crs',))])\n"
    )
    monkeypatch.syspath_prepend(str(location))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    delivery = tmp_path / "delivery"
    delivery.mkdir()
    (delivery / "c.gpkg").write_bytes(sample)
    (delivery / "c.gpkg.geoiso.json").write_text(json.dumps({"equal_area_crs": "ESRI:54009"}))
    assert cli.main(["add", str(delivery / "c.gpkg")]) == 2
    assert "unknown settings ['equal_area_crs']" in capsys.readouterr().err
    assert cli.main(["add", "-m", "team_defs", str(delivery / "c.gpkg")]) == 0
    assert capsys.readouterr().out == "c.gpkg\n"
    assert (inbox / "c.gpkg.geoiso.json").exists()
    with pytest.raises(ValueError, match="claimed by both"):
        clash = geo_asset(
            "clash",
            task="tests.standins.user_steps:area_km2",
            upstream="raw_features",
            config=ReprojectConfig,
            sidecar=("target_crs",),
        )
        build_definitions([clash])
