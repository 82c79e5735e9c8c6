"""The live stack: a real `dagster dev` (webserver + daemon) on 127.0.0.1, driven
through the webserver's GraphQL API (what the UI uses) and through the inbox."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import geopandas
import pyarrow.parquet as pq
import pytest

from geoiso_dagster.defs.assets import ASSET_NAMES
from geoiso_dagster.paths import output_path
from tests.harness.deploy import postgres_instance_yaml
from tests.harness.live import BIN, FAST_INBOX, DagsterDev, launch_params

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}"""
RUN = """query Run($id: ID!) { runOrError(runId: $id) { ... on Run { status
  tags { key value } } } }"""
RUNS = """{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }"""
FAILURES = """query Logs($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
  __typename ... on ExecutionStepFailureEvent { stepKey error { message }
  failureMetadata { description } } } } } }"""
CATALOG = """query Asset($path: [String!]!, $partition: String!) {
  assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(partitions: [$partition], limit: 1) { partition metadataEntries {
      label __typename
      ... on IntMetadataEntry { intValue }
      ... on TextMetadataEntry { text }
      ... on PathMetadataEntry { path }
      ... on MarkdownMetadataEntry { mdStr } } } } } }"""
CHECKS = """query Checks($path: [String!]!, $name: String!) {
  assetCheckExecutions(assetKey: {path: $path}, checkName: $name, limit: 50) {
    runId status evaluation { partition } } }"""


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory):
    """dagster dev on the repo's dagster.yaml (SQLite), then on deploy/dagster.yaml's
    Postgres storage, queue, pools and run monitoring: every test here runs on both."""
    root = tmp_path_factory.mktemp(f"live-{request.param}")
    (root / "data" / "inbox").mkdir(parents=True)
    instance_yaml, instance_env = None, {}
    if request.param == "postgres":
        instance_yaml = postgres_instance_yaml()
        instance_env = request.getfixturevalue("postgres").database("live")
    dev = DagsterDev(
        root / "home",
        root / "data",
        root / "dagster-dev.log",
        instance_yaml,
        **FAST_INBOX,
        **instance_env,
    ).start()
    yield dev
    dev.stop()


def _wait_run(server: DagsterDev, run_id: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.graphql(RUN, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    raise TimeoutError(f"run {run_id} still {status} after {timeout} s")


def _sensor_runs(server: DagsterDev, partition: str) -> list[dict]:
    runs = server.graphql(RUNS)["runsOrError"]["results"]
    return [
        r
        for r in runs
        if {"key": "dagster/partition", "value": partition} in r["tags"]
        and {"key": "dagster/sensor_name", "value": "inbox_sensor"} in r["tags"]
    ]


def _wait_sensor_run(server: DagsterDev, partition: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _sensor_runs(server, partition)
        if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return runs[0]
        time.sleep(1)
    raise TimeoutError(f"no finished sensor run for {partition} after {timeout} s")


def _drop(server: DagsterDev, source: Path, name: str) -> float:
    """Copy under a dot-name, then rename into the inbox: the way to drop a file."""
    inbox = server.data_root / "inbox"
    shutil.copy(source, inbox / f".{name}.part")
    os.rename(inbox / f".{name}.part", inbox / name)
    return time.monotonic()


def test_launch_through_graphql_and_read_the_catalog(server, tmp_path):
    source = tmp_path / "ui_countries.gpkg"
    shutil.copy("data/sample/countries.gpkg", source)
    key = subprocess.run(
        [BIN / "geoiso", "add", str(source)],
        env=server.env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    # Registered through the inbox, the sensor runs it too; this test launches its own.
    config = {
        "ops": {
            "reprojected_features": {"config": {"target_crs": "EPSG:6933"}},
            "dissolved_regions": {"config": {"dissolve_by": "continent"}},
        }
    }
    params = launch_params(key, config)
    launched = server.graphql(LAUNCH, {"params": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    assert _wait_run(server, launched["run"]["runId"]) == "SUCCESS"

    catalog = server.graphql(CATALOG, {"path": ["dissolved_regions"], "partition": key})
    (mat,) = catalog["assetOrError"]["assetMaterializations"]
    entries = {e["label"]: e for e in mat["metadataEntries"]}
    assert entries["dagster/row_count"]["intValue"] == 8
    assert entries["crs"]["text"] == "EPSG:6933"
    assert entries["path"]["path"] == str(output_path("dissolved_regions", key, server.data_root))
    assert entries["map"]["mdStr"].startswith("![8 regions](data:image/png;base64,")


def test_a_dropped_file_is_processed_by_the_sensor(server, naturalearth_shp, tmp_path):
    import geopandas

    frame = geopandas.read_file(naturalearth_shp)
    frame["region_id"] = frame["continent"]
    source = tmp_path / "dropped.gpkg"
    frame.to_file(source, layer="countries")
    dropped_at = _drop(server, source, "dropped.gpkg")
    dissolved = output_path("dissolved_regions", "dropped.gpkg", server.data_root)
    while not dissolved.exists() and time.monotonic() - dropped_at < 180:
        time.sleep(0.2)
    latency = time.monotonic() - dropped_at
    run = _wait_sensor_run(server, "dropped.gpkg")
    assert run["status"] == "SUCCESS"
    assert pq.ParquetFile(dissolved).metadata.num_rows == 8
    for asset in ASSET_NAMES:
        executions = server.graphql(CHECKS, {"path": [asset], "name": "integrity"})
        statuses = [
            e["status"]
            for e in executions["assetCheckExecutions"]
            if (e["evaluation"] or {}).get("partition") == "dropped.gpkg"
        ]
        assert statuses and statuses[0] == "SUCCEEDED", (asset, statuses, executions)
    print(f"drop -> dissolved output: {latency:.1f} s (settle 1 s, sensor interval 5 s)")


def test_a_bad_file_fails_once_clearly_and_others_are_unaffected(server, tmp_path):
    bad = tmp_path / "broken.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [ {"type": "Feat')
    good = tmp_path / "fine.gpkg"
    shutil.copy("data/sample/countries.gpkg", good)
    (server.data_root / "inbox" / "fine.gpkg.geoiso.json").write_text(
        json.dumps({"dissolve_by": "continent"})
    )
    _drop(server, bad, "broken.geojson")
    _drop(server, good, "fine.gpkg")
    bad_run = _wait_sensor_run(server, "broken.geojson")
    assert bad_run["status"] == "FAILURE"
    events = server.graphql(FAILURES, {"id": bad_run["runId"]})["logsForRun"]["events"]
    failures = [e for e in events if e["__typename"] == "ExecutionStepFailureEvent"]
    assert len(failures) == 1 and failures[0]["stepKey"] == "raw_features"
    text = failures[0]["error"]["message"]
    assert "broken.geojson" in text and "cannot be read as vector data" in text
    assert not any(e["__typename"] == "ExecutionStepUpForRetryEvent" for e in events)
    assert _wait_sensor_run(server, "fine.gpkg")["status"] == "SUCCESS"
    time.sleep(12)  # two more sensor ticks: the bad file is not retried by the sensor
    assert len(_sensor_runs(server, "broken.geojson")) == 1


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["tags"]}


def test_a_batch_with_a_bad_file_fails_it_alone_and_carries_the_others_on(
    server, naturalearth_shp, tmp_path
):
    """Five files dropped at once travel as two batch runs (one per run slot); the bad
    one fails its batch's first step with its own message, no retry; its neighbours are
    carried on by the remainder sensor; every good file ends with its own outputs,
    materializations and passed checks."""
    countries = geopandas.read_file(naturalearth_shp)
    countries["region_id"] = countries["continent"]
    names = [f"batch_{i}.gpkg" for i in range(5)]
    rows = {}
    for i, name in enumerate(names):
        if name == "batch_2.gpkg":
            (tmp_path / name).write_bytes(b"not a GeoPackage" * 64)
            continue
        part = countries.iloc[i::5]
        part.to_file(tmp_path / name, layer="countries")
        rows[name] = len(part)
    for name in names:
        _drop(server, tmp_path / name, name)
    outputs = {n: output_path("dissolved_regions", n, server.data_root) for n in rows}
    deadline = time.monotonic() + 240
    while not all(p.exists() for p in outputs.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(p.exists() for p in outputs.values())
    time.sleep(12)  # two more sensor ticks: nothing runs the bad file again
    runs = [
        r
        for r in server.graphql(RUNS)["runsOrError"]["results"]
        if _tags(r).get("dagster/asset_partition_range_start", "").startswith("batch_")
    ]
    by_start = {
        _tags(r)["dagster/asset_partition_range_start"]: r
        for r in runs
        if "geoiso/remainder_of" not in _tags(r)
    }
    failed = [r for r in runs if r["status"] == "FAILURE"]
    assert len(failed) == 1 and len(runs) == 3, [(r["status"], _tags(r)) for r in runs]
    assert _tags(failed[0])["dagster/asset_partition_range_end"] == "batch_2.gpkg"
    events = server.graphql(FAILURES, {"id": failed[0]["runId"]})["logsForRun"]["events"]
    assert not any(e["__typename"] == "ExecutionStepUpForRetryEvent" for e in events)
    (failure,) = [e for e in events if e["__typename"] == "ExecutionStepFailureEvent"]
    assert failure["stepKey"] == "raw_features"
    text = failure["error"]["message"]
    assert "1 of 3 files failed in raw_features" in text
    assert "batch_2.gpkg: Bad input:" in text and "its content is not GPKG data" in text
    remainders = [r for r in runs if "geoiso/remainder_of" in _tags(r)]
    assert [_tags(r)["geoiso/remainder_of"] for r in remainders] == [failed[0]["runId"]]
    assert remainders[0]["status"] == "SUCCESS"
    assert by_start["batch_3.gpkg"]["status"] == "SUCCESS"  # the other batch
    assert _tags(remainders[0])["dagster/asset_partition_range_end"] == "batch_1.gpkg"
    for name, count in rows.items():
        raw = server.graphql(CATALOG, {"path": ["raw_features"], "partition": name})
        (entry,) = raw["assetOrError"]["assetMaterializations"]
        meta = {m["label"]: m for m in entry["metadataEntries"]}
        assert meta["dagster/row_count"]["intValue"] == count, name  # its own metadata
        for asset in ASSET_NAMES:
            executions = server.graphql(CHECKS, {"path": [asset], "name": "integrity"})
            mine = [
                e["status"]
                for e in executions["assetCheckExecutions"]
                if (e["evaluation"] or {}).get("partition") == name
            ]
            assert mine[:1] == ["SUCCEEDED"], (name, asset, executions)
    assert not output_path("raw_features", "batch_2.gpkg", server.data_root).exists()


def test_stopping_the_server_leaves_no_process(tmp_path):
    dev = DagsterDev(tmp_path / "home", tmp_path / "data", tmp_path / "dev.log").start()
    assert len(dev.processes()) >= 3  # dagster dev, webserver, daemon (+ code servers)
    assert dev.stop() == []
