"""The inbox sensor on a bucket, through a real `dagster dev` (webserver, daemon, code
server, run processes) and a real S3 API server on 127.0.0.1: a shapefile uploaded part
by part with its settings sidecar becomes three published objects, and a bad file fails
alone with a clear message."""

import time

import geopandas
import pytest

from tests.harness.live import FAST_INBOX, DagsterDev
from tests.harness.s3 import SECRET_KEY, objects
from tests.test_live import RUNS, _wait_run

WAREHOUSE = "team-a/warehouse"


def _sensor_run(server: DagsterDev, partition: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in server.graphql(RUNS)["runsOrError"]["results"]:
            tags = {t["key"]: t["value"] for t in run["tags"]}
            if tags.get("dagster/partition") == partition and "dagster/sensor_name" in tags:
                return run
        time.sleep(1)
    raise TimeoutError(f"the sensor launched no run for {partition} in {timeout} s")


@pytest.mark.timeout(420)
def test_files_uploaded_to_the_bucket_inbox_are_processed_by_the_sensor(
    s3_root, naturalearth_shp, tmp_path
):
    client = s3_root.client
    env = {**s3_root.env, **FAST_INBOX}
    root = env.pop("GEOISO_DATA_ROOT")
    dev = DagsterDev(tmp_path / "home", root, tmp_path / "dagster-dev.log", **env).start()
    try:
        # The shapefile's parts first, its sidecar, then the .shp: the way a sync tool
        # would deliver them. Each part is a separate object.
        shp = naturalearth_shp
        started = time.monotonic()
        for part in sorted(shp.parent.glob(f"{shp.stem}.*"), key=lambda p: p.suffix == ".shp"):
            client.upload_file(str(part), "geo", f"team-a/inbox/countries{part.suffix}")
        client.put_object(
            Bucket="geo",
            Key="team-a/inbox/countries.shp.geoiso.json",
            Body=b'{"dissolve_by": "continent", "target_crs": "EPSG:6933"}',
        )
        client.put_object(Bucket="geo", Key="team-a/inbox/broken.gpkg", Body=b"not a gpkg")

        run = _sensor_run(dev, "countries.shp")
        assert _wait_run(dev, run["runId"]) == "SUCCESS"
        latency = time.monotonic() - started
        published = objects(client, "geo", WAREHOUSE)
        for asset in ("raw_features", "reprojected_features", "dissolved_regions"):
            assert f"{WAREHOUSE}/{asset}/countries.shp.parquet" in published
        local = tmp_path / "dissolved.parquet"
        client.download_file(
            "geo", f"{WAREHOUSE}/dissolved_regions/countries.shp.parquet", str(local)
        )
        dissolved = geopandas.read_parquet(local)
        source = geopandas.read_file(shp)
        assert sorted(dissolved["continent"]) == sorted(source["continent"].unique())
        assert dissolved.crs.to_epsg() == 6933
        assert dissolved["feature_count"].sum() == len(source)

        bad = _sensor_run(dev, "broken.gpkg")
        assert _wait_run(dev, bad["runId"]) == "FAILURE"
        assert not any("broken.gpkg" in key for key in objects(client, "geo", WAREHOUSE))
        assert not [k for k in published if k.rpartition("/")[2].startswith(".")]
        print(f"upload -> dissolved object via the sensor: {latency:.1f} s (settle 1 s, tick 5 s)")
    finally:
        alive = dev.stop()
    assert alive == []
    log = (tmp_path / "dagster-dev.log").read_text(errors="replace")
    assert SECRET_KEY not in log
