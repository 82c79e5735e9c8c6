"""Inbox sources read in place from an s3:// root (a real S3 API server on 127.0.0.1):
every format through GDAL's /vsis3/ (a shapefile with its part objects) or Arrow, by
range requests, never copied to the host; the source jail's rules on objects; GDAL's
network open for the source's own objects only, and only while it is read."""

import json
from pathlib import Path

import geopandas
import numpy as np
import pytest
from dagster import instance_for_test, materialize

from geoiso_dagster import objectstore, paths
from geoiso_dagster.dataroot import BucketRoot
from geoiso_dagster.defs.assets import geo_assets
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import TASK_MODULE, SpatialWorkerPool
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.pool import PoolSettings, WorkerPool
from tests.harness.runs import failure_of, retries
from tests.harness.s3 import ACCESS_KEY, SECRET_KEY, FaultyProxy, assert_secretless

INBOX = "team-a/inbox"
WAREHOUSE = "team-a/warehouse"
FORMATS = ["shp", "fgb", "geojson", "gpkg", "parquet"]
# The parts a shapefile is written with here.
SHAPEFILE = [".shp", ".shx", ".dbf", ".prj", ".cpg"]


@pytest.fixture(scope="module")
def countries(tmp_path_factory) -> dict[str, Path]:
    """The sample countries in each format, written by geopandas."""
    folder = tmp_path_factory.mktemp("formats")
    frame = geopandas.read_file("data/sample/countries.gpkg")
    made = {}
    for ext in FORMATS:
        path = folder / f"countries.{ext}"
        if ext == "parquet":
            frame.to_parquet(path)
        else:
            frame.to_file(path)
        made[ext] = path
    return made


def _upload(client, path: Path, name: str | None = None) -> str:
    """Upload `path` (with a shapefile's parts) into the inbox; its object name."""
    name = name or path.name
    stem = name.rpartition(".")[0]
    if path.suffix == ".shp":
        for part in SHAPEFILE[1:]:
            client.upload_file(str(path.with_suffix(part)), "geo", f"{INBOX}/{stem}{part}")
    client.upload_file(str(path), "geo", f"{INBOX}/{name}")
    return name


def _run(instance, key, selection=("raw_features",), **pool):
    instance.add_dynamic_partitions(source_files.name, [key])
    return materialize(
        geo_assets,
        instance=instance,
        partition_key=key,
        selection=list(selection),
        resources={"spatial_pool": SpatialWorkerPool.fixed(max_workers=2, **pool)},
        raise_on_error=False,
    )


def _published(client, key: str, tmp_path: Path) -> geopandas.GeoDataFrame:
    local = tmp_path / f"published-{key}.parquet"
    client.download_file("geo", f"{WAREHOUSE}/raw_features/{key}.parquet", str(local))
    return geopandas.read_parquet(local)


def _mirrored_sources() -> list[str]:
    inbox = paths.data_root() / "inbox"
    if not inbox.exists():
        return []
    return sorted(p.name for p in inbox.iterdir() if not p.name.startswith("."))  # not ETags


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.timeout(180)
def test_each_format_is_read_in_place_by_range_requests_or_fetched_whole(
    ext, countries, s3_root, tmp_path, monkeypatch
):
    name = _upload(s3_root.client, countries[ext])
    proxy = FaultyProxy(s3_root.server.endpoint, lambda method, path: False, 0)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with instance_for_test() as instance:
            result = _run(instance, name)
            logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    finally:
        proxy.stop()
    assert result.success, failure_of(result)
    if ext == "gpkg":  # SQLite reads its CRS table from a file (dataroot.in_place)
        assert any("raw_features: S3 transfers: input (fetch " in m for m in logged), logged
        assert _mirrored_sources() == ["countries.gpkg"]
    else:
        assert any("raw_features: S3 transfers: input (read in place)" in m for m in logged)
        assert _mirrored_sources() == [], "the source was copied to the host"

    source_gets = [
        (path, byte_range)
        for method, path, byte_range in proxy.requests
        if method == "GET" and path.startswith(f"/geo/{INBOX}/countries.")
    ]
    assert source_gets, "the source was not read through the server"
    # A FlatGeobuf's features are walked once against its header's count (one whole
    # GET, spatial/declared.py), GDAL reads it by ranges; GeoJSON is streamed whole (the
    # CRS scan, and GDAL's own reads).
    whole = [p for p, byte_range in source_gets if not byte_range and not p.endswith(".shx")]
    if ext == "fgb":
        assert whole == [f"/geo/{INBOX}/countries.fgb"], whole
        assert any(byte_range for _, byte_range in source_gets), "GDAL read no range"
    elif ext not in ("geojson", "gpkg"):
        # A shapefile's index is streamed whole by its integrity check (every record's
        # offset against the .shp's length); the data itself is read by ranges.
        assert whole == [], f"whole-object GETs of {whole}"
    if ext == "shp":
        read = {path.rpartition(".")[2].split("?")[0] for path, _ in source_gets}
        assert {"shp", "shx", "dbf"} <= read, read

    expected = geopandas.read_file(countries[ext]) if ext != "parquet" else None
    expected = geopandas.read_parquet(countries[ext]) if expected is None else expected
    published = _published(s3_root.client, name, tmp_path)
    assert len(published) == len(expected) == 177
    assert published.crs == expected.crs
    np.testing.assert_allclose(
        published.to_crs(6933).area.sum(), expected.to_crs(6933).area.sum(), rtol=1e-9
    )
    assert set(published["name"]) == set(expected["name"])


def test_a_shapefile_in_the_bucket_is_checked_part_by_part(countries, s3_root):
    client = s3_root.client
    shp = countries["shp"]
    # No index object: refused by the listing, before GDAL opens anything.
    for part in (".shp", ".dbf", ".prj"):
        client.upload_file(str(shp.with_suffix(part)), "geo", f"{INBOX}/noindex{part}")
    # A .dbf cut short: its header declares more records than the object holds.
    for part in SHAPEFILE:
        client.upload_file(str(shp.with_suffix(part)), "geo", f"{INBOX}/cut{part}")
    dbf = shp.with_suffix(".dbf").read_bytes()
    client.put_object(Bucket="geo", Key=f"{INBOX}/cut.dbf", Body=dbf[: len(dbf) // 2])
    with instance_for_test() as instance:
        missing = _run(instance, "noindex.shp")
        cut = _run(instance, "cut.shp")
        for result in (missing, cut):
            assert not result.success
            assert retries(instance, result) == []
    assert f"s3://geo/{INBOX}/noindex.shp: shapefile is missing its .shx" in failure_of(missing)
    assert f"s3://geo/{INBOX}/cut.shp: its .dbf declares 177 records but holds" in failure_of(cut)
    assert "Contents" not in client.list_objects_v2(Bucket="geo", Prefix=WAREHOUSE)


@pytest.mark.timeout(120)
def test_gdal_opens_only_the_source_objects_and_only_while_reading(countries, s3_root, monkeypatch):
    """In a real worker, while a source is read: other objects of the inbox, objects
    outside the root's prefix and the same object by plain URL are all refused, and the
    server never sees a request for them; afterwards the source itself is refused, and no
    AWS option or variable for GDAL is left in the worker."""
    client = s3_root.client
    _upload(client, countries["fgb"])
    client.upload_file(str(countries["fgb"]), "geo", f"{INBOX}/other.fgb")
    client.upload_file(str(countries["fgb"]), "geo", "elsewhere/countries.fgb")
    proxy = FaultyProxy(s3_root.server.endpoint, lambda method, path: False, 0)
    source = f"s3://geo/{INBOX}/countries.fgb"
    others = [
        f"/vsis3/geo/{INBOX}/other.fgb",
        "/vsis3/geo/elsewhere/countries.fgb",
        f"/vsis3/geo/{INBOX}/countries.FGB",
        f"/vsicurl/{proxy.endpoint}/geo/{INBOX}/other.fgb",
        f"/vsicurl/{proxy.endpoint}/geo/{INBOX}/countries.fgb",
    ]
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        settings = PoolSettings(max_workers=1, task_module="tests.standins.s3_sources")
        with WorkerPool(settings) as pool:
            facts = pool.run("open_while_reading", source=source, others=others).facts
    finally:
        proxy.stop()
    during = facts["during"]
    assert during[f"/vsis3/geo/{INBOX}/countries.fgb"] == "opened: 177 features"
    for name in others:
        assert during[name].startswith("refused"), (name, during[name])
    assert facts["after"].startswith("refused")
    paths_seen = {path.split("?")[0] for _, path, _ in proxy.requests}
    assert f"/geo/{INBOX}/countries.fgb" in paths_seen
    assert f"/geo/{INBOX}/other.fgb" not in paths_seen
    assert "/geo/elsewhere/countries.fgb" not in paths_seen
    assert f"/geo/{INBOX}/countries.FGB" not in paths_seen
    assert facts["aws_options_left"] == []
    assert facts["gdal_aws_environment"] == []
    assert_secretless(json.dumps(facts))


def test_aws_settings_are_translated_for_gdal(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/geoiso-tests")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/geoiso-tests")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example.org:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    options = objectstore.gdal_config(
        ["s3://geo/team-a/inbox/a.shp", "s3://geo/team-a/inbox/a.dbf"]
    )
    assert options["AWS_S3_ENDPOINT"] == "minio.example.org:9000"
    assert options["AWS_HTTPS"] == "YES"
    assert options["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert options["AWS_REGION"] == "eu-west-3"
    assert options["AWS_ACCESS_KEY_ID"] == ACCESS_KEY
    assert options["AWS_NO_SIGN_REQUEST"] is None
    assert options["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] == (
        "vsis3/geo/team-a/inbox/a.shp,vsis3/geo/team-a/inbox/a.dbf"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("GEOISO_S3_ADDRESSING_STYLE", "virtual")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = objectstore.gdal_config(["s3://geo/a.fgb"])
    assert options["CPL_VSIL_CURL_ALLOWED_FILENAME"] == "/vsis3/geo/a.fgb"  # exact
    assert "CPL_VSIL_CURL_ALLOWED_EXTENSIONS" not in options
    assert options["AWS_S3_ENDPOINT"] == "127.0.0.1:9000"
    assert options["AWS_HTTPS"] == "NO"
    assert options["AWS_VIRTUAL_HOSTING"] == "TRUE"
    assert options["AWS_NO_SIGN_REQUEST"] == "YES"
    assert options["AWS_SECRET_ACCESS_KEY"] is None


@pytest.mark.parametrize(
    "uri, read_in_place",
    [
        # SQLite reads a GeoPackage's CRS table from a file first (spatial/declared.py)
        ("s3://geo/team-a/inbox/roads.gpkg", False),
        ("s3://geo/team-a/inbox/Roads_2025-v1.shp", True),
        ("s3://geo/team-a/inbox/roads.zip", False),  # unpacked from a local file
        ("s3://geo/team-a/inbox/roads, east.fgb", False),  # GDAL splits its list at , and ' '
        ("s3://geo/team-a/inbox/roads?x=1.fgb", False),
        ("s3://geo/team-a/inbox/roads#1.fgb", False),
    ],
)
def test_names_gdal_cannot_be_given_safely_are_fetched_instead(uri, read_in_place, monkeypatch):
    monkeypatch.delenv("GEOISO_S3_SOURCES", raising=False)
    assert BucketRoot.in_place(uri) is read_in_place
    monkeypatch.setenv("GEOISO_S3_SOURCES", "fetch")  # every source, by choice
    assert BucketRoot.in_place(uri) is False
    monkeypatch.setenv("GEOISO_S3_SOURCES", "stream")
    with pytest.raises(BadInputError, match="GEOISO_S3_SOURCES='stream': must be"):
        BucketRoot.in_place(uri)


@pytest.mark.timeout(120)
def test_sources_are_fetched_when_the_setting_says_so(countries, s3_root, monkeypatch):
    monkeypatch.setenv("GEOISO_S3_SOURCES", "fetch")
    name = _upload(s3_root.client, countries["shp"])
    with instance_for_test() as instance:
        result = _run(instance, name)
        logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert result.success
    assert any("raw_features: S3 transfers: input (fetch 0." in m for m in logged), logged
    assert _mirrored_sources() == sorted(f"countries{part}" for part in SHAPEFILE)


@pytest.mark.timeout(240)
def test_a_source_replaced_while_it_was_read_is_read_again(
    countries, s3_root, tmp_path, monkeypatch
):
    """The object changes between the step's reads (here: during the read-back): the
    step is retried as transient and publishes what the new version holds."""
    name = _upload(s3_root.client, countries["fgb"])
    smaller = tmp_path / "smaller.fgb"
    geopandas.read_file(countries["fgb"]).head(100).to_file(smaller)
    monkeypatch.setenv("GEOISO_TEST_REPLACEMENT", str(smaller))
    with instance_for_test() as instance:
        # Unconfined: the stand-in plays another writer replacing the object, reading the
        # replacement from the test's folder and leaving a marker there.
        result = _run(instance, name, task_module="tests.standins.s3_sources", sandbox="off")
        assert result.success and len(retries(instance, result)) == 1
        logged = "\n".join(e.user_message or "" for e in instance.all_logs(result.run_id))
    assert f"s3://geo/{INBOX}/countries.fgb: changed while it was being read" in logged
    assert len(_published(s3_root.client, name, tmp_path)) == 100


@pytest.mark.timeout(300)
def test_server_errors_while_gdal_reads_are_retried_and_named_without_credentials(
    countries, s3_root, monkeypatch
):
    """A few 500s are absorbed by GDAL's (and boto3's) own retries; an outage is transient: retried
    by the step's policy, then a failure naming the object, never a credential."""
    name = _upload(s3_root.client, countries["fgb"])
    target = f"/geo/{INBOX}/countries.fgb"

    def gdal_read(method: str, path: str) -> bool:
        return method == "GET" and path.split("?")[0] == target

    for failures, succeeds in ((2, True), (10_000, False)):
        proxy = FaultyProxy(s3_root.server.endpoint, gdal_read, failures)
        try:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            with instance_for_test() as instance:
                result = _run(instance, name)
                waits = retries(instance, result)
                logged = (e.user_message or "" for e in instance.all_logs(result.run_id))
                text = "\n".join([*(str(e) for e in result.all_events), *logged])
        finally:
            proxy.stop()
        assert proxy.failed > 0
        assert result.success is succeeds
        if succeeds:
            assert waits == []
        else:
            assert len(waits) == 2
            failure = failure_of(result)
            assert f"s3://geo/{INBOX}/countries.fgb" in failure and "attempt 3 of 3" in failure
            assert any(
                cause in failure
                for cause in (
                    "S3 read failed (HTTP 500)",  # GDAL's read
                    "could not open",
                    "the S3 service failed (InternalError, HTTP 500)",  # the header's check
                )
            ), failure
        assert_secretless(text)


@pytest.mark.timeout(120)
def test_a_zip_object_given_to_a_worker_is_unpacked_from_a_private_copy(countries, s3_root):
    """Steps fetch zips; a task handed a zip object directly downloads it beside its
    output, unpacks it with the archive limits, and names the object in its errors."""
    import zipfile

    archive = countries["fgb"].with_name("countries-fgb.zip")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(countries["fgb"], "countries.fgb")
    s3_root.client.upload_file(str(archive), "geo", f"{INBOX}/countries-fgb.zip")
    s3_root.client.put_object(Bucket="geo", Key=f"{INBOX}/broken.zip", Body=b"PK not a zip")
    output = paths.data_root() / "warehouse" / "raw_features" / "countries-fgb.zip.parquet"
    output.parent.mkdir(parents=True)
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=1)) as pool:
        facts = pool.run(
            "ingest", source=f"s3://geo/{INBOX}/countries-fgb.zip", output=str(output)
        ).facts
        with pytest.raises(BadInputError, match=f"s3://geo/{INBOX}/broken.zip: is not a readable"):
            pool.run("ingest", source=f"s3://geo/{INBOX}/broken.zip", output=str(output) + "2")
    assert facts["rows"] == 177 and len(geopandas.read_parquet(output)) == 177
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name], "a copy was left"
