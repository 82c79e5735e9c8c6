"""Real runs on an s3:// data root (a real S3 API server on 127.0.0.1): the whole chain
through the real `dagster asset materialize`, then faults in real workers and in the
object store. After each: the published objects are whole (or as before), nothing
staged or half-uploaded is left, retries are as the failure table says, and no
credential appears in any message."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from dagster import AssetKey, DagsterInstance, instance_for_test, materialize

from geoiso_dagster.defs.assets import ASSET_NAMES, geo_assets
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import SpatialWorkerPool
from tests.harness.live import materialize_command
from tests.harness.runs import failure_of, retries
from tests.harness.s3 import (
    FaultyProxy,
    S3Server,
    assert_secretless,
    free_port,
    objects,
    open_uploads,
)

BIN = Path(sys.executable).parent
KEY = "countries.gpkg"
CONFIG = {
    "ops": {
        "reprojected_features": {"config": {"target_crs": "EPSG:6933"}},
        "dissolved_regions": {"config": {"dissolve_by": "continent"}},
    }
}
WAREHOUSE = "team-a/warehouse"


def _published(client) -> dict[str, int]:
    return objects(client, "geo", WAREHOUSE)


def _staged(client) -> list[str]:
    return [k for k in _published(client) if k.rpartition("/")[2].startswith(".")]


def _read(client, key: str, tmp_path: Path) -> geopandas.GeoDataFrame:
    local = tmp_path / key.replace("/", "_")
    client.download_file("geo", key, str(local))
    return geopandas.read_parquet(local)


@pytest.mark.timeout(300)
def test_the_whole_chain_on_a_bucket_through_the_dagster_cli(s3_root, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy("deploy/local/dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, **s3_root.env, "DAGSTER_HOME": str(home)}
    work = tmp_path / "cwd"
    work.mkdir()
    added = subprocess.run(
        [BIN / "geoiso", "add", str(Path("data/sample/countries.gpkg").resolve())],
        env=env, cwd=work, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout.split() == [KEY]
    inbox = objects(s3_root.client, "geo", "team-a/inbox/")
    assert sorted(inbox) == [
        "team-a/inbox/countries.gpkg",
        "team-a/inbox/countries.gpkg.geoiso.json",
    ]

    run = subprocess.run(
        [str(c) for c in materialize_command(KEY, CONFIG)],
        env=env, cwd=Path.cwd(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(_published(s3_root.client)) == [
        f"{WAREHOUSE}/{asset}/{KEY}.parquet" for asset in sorted(ASSET_NAMES)
    ]
    assert open_uploads(s3_root.client, "geo") == []
    assert list(work.iterdir()) == [], "nothing written under the working directory"

    # The published objects, read straight from the bucket, against an independent
    # computation on the source file.
    source = geopandas.read_file("data/sample/countries.gpkg")
    raw = _read(s3_root.client, f"{WAREHOUSE}/raw_features/{KEY}.parquet", tmp_path)
    assert len(raw) == len(source) == 177
    dissolved = _read(s3_root.client, f"{WAREHOUSE}/dissolved_regions/{KEY}.parquet", tmp_path)
    assert dissolved.crs.to_epsg() == 6933
    expected = source.to_crs(6933).assign(area=lambda f: f.geometry.area)
    expected = expected.groupby("continent")["area"].sum()
    got = dissolved.set_index("continent").geometry.area
    assert sorted(got.index) == sorted(expected.index)
    np.testing.assert_allclose(got[expected.index].to_numpy(), expected.to_numpy(), rtol=1e-6)

    shown = subprocess.run(
        [BIN / "geoiso", "show", KEY], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert (
        f"dissolved_regions     rows=8      crs=EPSG:6933  s3://geo/{WAREHOUSE}/dissolved_regions/"
        in shown.stdout
    )
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with DagsterInstance.get() as instance:
            for name in ASSET_NAMES:
                md = instance.get_latest_materialization_event(
                    AssetKey(name)
                ).asset_materialization.metadata
                uri = f"s3://geo/{WAREHOUSE}/{name}/{KEY}.parquet"
                assert md["dagster/uri"].value == uri and md["path"].value == uri
    finally:
        os.environ.pop("DAGSTER_HOME")
    for text in (added.stdout + added.stderr, run.stdout + run.stderr, shown.stdout):
        assert_secretless(text)
    for stored in home.rglob("*"):
        if stored.is_file():
            assert_secretless(stored.read_bytes().decode("utf-8", "replace"))


@pytest.fixture
def instance(s3_root):
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(source_files.name, [KEY])
        yield instance


def _run(instance, selection=None, **pool):
    return materialize(
        geo_assets,
        instance=instance,
        partition_key=KEY,
        run_config=None if selection else CONFIG,
        selection=selection,
        resources={"spatial_pool": SpatialWorkerPool(max_workers=2, **pool)},
        raise_on_error=False,
    )


def _all_text(instance, result) -> str:
    """Every event of the run and every line of its log."""
    logged = (entry.user_message or "" for entry in instance.all_logs(result.run_id))
    return "\n".join([*(str(e) for e in result.all_events), *logged])


def _big_source(path: Path, rows: int = 30_000) -> None:
    """A GeoParquet source whose raw_features output needs a multipart upload (> 5 MiB)."""
    rng = np.random.default_rng(7)
    centres = rng.uniform([-170, -80], [170, 80], size=(rows, 2))
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 0.1
    polygons = shapely.polygons(centres[:, None, :] + ring[None, :, :])
    frame = geopandas.GeoDataFrame({"region_id": np.arange(rows) % 50}, geometry=polygons)
    frame.set_crs(4326).to_parquet(path)


@pytest.mark.timeout(240)
def test_a_worker_killed_mid_upload_publishes_nothing_partial(
    instance, s3_root, tmp_path, monkeypatch
):
    source = tmp_path / "big.parquet"
    _big_source(source)
    key = "big.parquet"
    instance.add_dynamic_partitions(source_files.name, [key])
    s3_root.client.upload_file(str(source), "geo", f"team-a/inbox/{key}")
    monkeypatch.setenv("GEOISO_S3_PART_MB", "5")

    def run():
        return materialize(
            geo_assets, instance=instance, partition_key=key, selection=["raw_features"],
            resources={"spatial_pool": SpatialWorkerPool(max_workers=2)}, raise_on_error=False,
        )  # fmt: skip

    assert run().success
    published = f"{WAREHOUSE}/raw_features/{key}.parquet"
    before = s3_root.client.head_object(Bucket="geo", Key=published)
    assert before["ContentLength"] > 6 * 2**20, "the output must need a multipart upload"

    state = tmp_path / "fault-state"
    fault = {"task": "upload", "at": "part", "fault": "sigkill", "times": 3, "state": str(state)}
    monkeypatch.setenv("GEOISO_FAULTS", json.dumps([fault]))
    result = run()
    assert len(list(state.glob("fired-*"))) == 3
    assert not result.success
    assert len(retries(instance, result)) == 2
    assert "attempt 3 of 3" in failure_of(result) and "SIGKILL" in failure_of(result)
    after = s3_root.client.head_object(Bucket="geo", Key=published)
    assert after["ETag"] == before["ETag"], "the previous output was replaced"
    assert _staged(s3_root.client) == []
    assert open_uploads(s3_root.client, "geo") == [], "a killed upload was left open"

    monkeypatch.delenv("GEOISO_FAULTS")
    assert run().success
    assert pq.ParquetFile(source).metadata.num_rows == 30_000


def test_a_deleted_source_and_a_missing_bucket_fail_once_naming_them(
    instance, s3_root, monkeypatch
):
    result = _run(instance, selection=["raw_features"])  # registered, never uploaded
    assert not result.success
    assert retries(instance, result) == []
    assert "s3://geo/team-a/inbox/countries.gpkg: does not exist" in failure_of(result)

    monkeypatch.setenv("GEOISO_DATA_ROOT", "s3://missing-bucket/team-a")
    result = _run(instance, selection=["raw_features"])
    assert retries(instance, result) == []
    assert "the bucket 'missing-bucket' does not exist" in failure_of(result)
    assert_secretless(_all_text(instance, result))


@pytest.mark.timeout(240)
def test_an_unreachable_endpoint_is_retried_then_fails_and_5xx_heals(
    instance, s3_root, monkeypatch
):
    s3_root.client.upload_file("data/sample/countries.gpkg", "geo", f"team-a/inbox/{KEY}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    result = _run(instance, selection=["raw_features"])
    assert len(retries(instance, result)) == 2
    assert "S3 endpoint unreachable" in failure_of(result) and "attempt 3 of 3" in failure_of(
        result
    )

    # The staged object's upload answered with 500 three times (the client's own attempts):
    # one step retry, then the output is published.
    proxy = FaultyProxy(
        s3_root.server.endpoint, lambda method, path: method == "PUT" and ".tmp-" in path, 3
    )
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        result = _run(instance, selection=["raw_features"])
    finally:
        proxy.stop()
    assert proxy.failed == 3
    assert result.success
    assert len(retries(instance, result)) == 1
    assert _staged(s3_root.client) == [] and open_uploads(s3_root.client, "geo") == []
    assert_secretless(_all_text(instance, result))


def test_access_denied_is_named_without_credentials_and_not_retried(
    instance, s3_root, tmp_path, monkeypatch
):
    strict = S3Server(tmp_path / "strict.log", enforce_auth=True)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        result = _run(instance, selection=["raw_features"])
    finally:
        strict.stop()
    assert retries(instance, result) == []
    assert "access denied by the bucket 'geo'" in failure_of(result)
    assert_secretless(_all_text(instance, result))


@pytest.mark.timeout(300)
def test_a_batch_run_killed_mid_step_leaves_only_swept_staged_objects(s3_root, tmp_path):
    """A batch run of three files on a bucket is SIGKILLed while one dissolve hangs: the
    other files' dissolved outputs are staged objects (uploaded, read back, waiting for
    the batch to publish), never published ones. Running the batch again sweeps the dead
    run's staged objects and publishes every file."""
    from tests.test_faults import _kill_and_expect_no_orphans, _start_with_a_hung_dissolve

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy("deploy/local/dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, **s3_root.env, "DAGSTER_HOME": str(home)}
    keys = ["k1.gpkg", "k2.gpkg", "k3.gpkg"]
    for key in keys:
        shutil.copy("data/sample/countries.gpkg", tmp_path / key)
    subprocess.run([BIN / "geoiso", "add", *[str(tmp_path / k) for k in keys]], env=env, check=True)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    tags = {"dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1]}  # fmt: skip
    command = [
        BIN / "dagster", "job", "execute", "-m", "geoiso_dagster.definitions",
        "-j", "geo_pipeline", "-c", str(config), "--tags", json.dumps(tags),
    ]  # fmt: skip
    run = _start_with_a_hung_dissolve(command, env, tmp_path / "fault-state")
    dissolved = f"{WAREHOUSE}/dissolved_regions/"
    deadline = time.monotonic() + 60
    while len([k for k in _staged(s3_root.client) if k.startswith(dissolved)]) < 2:
        assert time.monotonic() < deadline, "the other files' dissolves were not staged"
        time.sleep(0.2)
    _kill_and_expect_no_orphans(run)

    published = _published(s3_root.client)
    assert not [
        k for k in published if k.startswith(dissolved) and k not in _staged(s3_root.client)
    ]
    for key in keys:
        for asset in ("raw_features", "reprojected_features"):
            assert f"{WAREHOUSE}/{asset}/{key}.parquet" in published
    left = _staged(s3_root.client)
    assert len(left) >= 2 and all(".tmp-" in k for k in left)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _staged(s3_root.client) == [] and open_uploads(s3_root.client, "geo") == []
    for key in keys:
        assert f"{dissolved}{key}.parquet" in _published(s3_root.client)


def test_an_upstream_output_is_read_in_place_when_this_host_has_no_copy(
    instance, s3_root, monkeypatch
):
    """The step after raw_features on another host (here: its mirror wiped) reads the
    published object in place, by range requests, never the whole object, and never
    makes a local copy of it; its output equals the one made from the mirror."""
    from geoiso_dagster import paths

    s3_root.client.upload_file("data/sample/countries.gpkg", "geo", f"team-a/inbox/{KEY}")
    assert _run(instance, selection=["raw_features", "reprojected_features"]).success
    before = s3_root.client.get_object(
        Bucket="geo", Key=f"{WAREHOUSE}/reprojected_features/{KEY}.parquet"
    )["Body"].read()
    shutil.rmtree(paths.data_root())
    proxy = FaultyProxy(s3_root.server.endpoint, lambda method, path: False, 0)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        result = _run(instance, selection=["reprojected_features"])
    finally:
        proxy.stop()
    assert result.success
    raw = f"/geo/{WAREHOUSE}/raw_features/{KEY}.parquet"
    reads = [(m, r) for m, p, r in proxy.requests if p.split("?")[0] == raw and m == "GET"]
    assert reads, "the upstream object was not read"
    assert all(r and r.startswith("bytes=") for _, r in reads), f"a whole-object GET: {reads}"
    assert not (paths.data_root() / "warehouse" / "raw_features" / f"{KEY}.parquet").exists()
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("reprojected_features: S3 transfers: input (read in place)" in m for m in logged)
    after = s3_root.client.get_object(
        Bucket="geo", Key=f"{WAREHOUSE}/reprojected_features/{KEY}.parquet"
    )["Body"].read()
    assert pq.ParquetFile(pa_buffer(after)).read().equals(pq.ParquetFile(pa_buffer(before)).read())


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def test_a_step_of_your_own_runs_on_a_bucket_with_a_reference_layer(instance, s3_root, tmp_path):
    """geo_asset on an s3:// root: its source (the upstream object), its reference layer
    (an object under <root>/reference/), its staged upload, read-back and publish."""
    import shapely

    from geoiso_dagster import Reference, geo_asset
    from geoiso_dagster.spatial import io

    mask = geopandas.GeoDataFrame(geometry=[shapely.box(-2e6, -4e6, 4e6, 4e6)], crs=6933)
    io.write_geoparquet(mask, tmp_path / "mask.parquet")
    s3_root.client.upload_file(
        str(tmp_path / "mask.parquet"), "geo", "team-a/reference/mask.parquet"
    )
    s3_root.client.upload_file("data/sample/countries.gpkg", "geo", f"team-a/inbox/{KEY}")
    clipped = geo_asset(
        "clipped",
        task="geoiso_dagster.ops:clip",
        upstream="reprojected_features",
        inputs={"mask": Reference("mask.parquet")},
    )
    result = materialize(
        [*geo_assets, clipped],
        instance=instance,
        partition_key=KEY,
        run_config={"ops": {"reprojected_features": CONFIG["ops"]["reprojected_features"]}},
        selection=["raw_features", "reprojected_features", "clipped"],
        resources={"spatial_pool": SpatialWorkerPool(max_workers=2)},
        raise_on_error=False,
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("clipped")
    assert mat.metadata["dagster/uri"].value == f"s3://geo/{WAREHOUSE}/clipped/{KEY}.parquet"
    got = _read(s3_root.client, f"{WAREHOUSE}/clipped/{KEY}.parquet", tmp_path)
    countries = geopandas.read_file("data/sample/countries.gpkg").to_crs(6933)
    expected = geopandas.clip(countries.set_geometry(countries.make_valid()), mask)
    assert len(got) == len(expected) > 10
    assert got.area.sum() == pytest.approx(expected.area.sum(), rel=1e-9)
    assert not _staged(s3_root.client)
