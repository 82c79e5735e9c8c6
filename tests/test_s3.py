"""An s3:// data root against a real S3 API server on 127.0.0.1 (tests/harness/s3.py): root
parsing, the object store's errors, the bucket inbox, the sweep of staged objects."""

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geoiso_dagster import dataroot, fsutil, inbox, objectstore, paths
from geoiso_dagster.defs.assets import geo_assets
from geoiso_dagster.defs.steps import sidecar_rules
from geoiso_dagster.errors import (
    BadInputError,
    StorageAccessError,
    TransientIOError,
    UnsafeNameError,
)
from tests.harness.s3 import ACCESS_KEY, SECRET_KEY, FaultyProxy, S3Server, free_port, open_uploads

BIN = Path(sys.executable).parent
ROOT = objectstore.S3Root("geo", "team-a")


@pytest.mark.parametrize(
    "root, cause",
    [
        ("gs://geo/team-a", "scheme 'gs' is not supported"),
        ("https://example.org/data", "scheme 'https' is not supported"),
        ("s3:/geo/team-a", "is not of the form s3://bucket/prefix"),
        ("s3:geo", "is not of the form s3://bucket/prefix"),
        ("s3://Geo_Bucket/a", "is not an S3 bucket name"),
        ("s3://ab/a", "is not an S3 bucket name"),
        ("s3://geo/team-a/../team-b", "no empty, '.' or '..' parts"),
        ("s3://geo/team a", "no empty, '.' or '..' parts"),
        ("s3://geo//a", "no empty, '.' or '..' parts"),
        ("file:///data", "scheme 'file' is not supported"),
        ("//host/share", None),  # a local (absolute) folder
        ("/data:2025", None),  # a folder whose name holds a ':'
        ("://geo", "scheme '(none)' is not supported"),
    ],
)
def test_a_root_the_project_cannot_serve_is_refused(root, cause):
    if cause is None:
        assert dataroot.parse_root(root) == dataroot.LocalRoot(Path(root).resolve())
        return
    with pytest.raises(dataroot.DataRootError, match=re.escape(cause)):
        dataroot.parse_root(root)


def test_s3_roots_parse_and_keep_keys_inside_the_prefix():
    assert dataroot.parse_bucket("s3://geo/team-a/") == ROOT
    assert dataroot.parse_bucket("s3://geo") == objectstore.S3Root("geo", "")
    assert ROOT.key("inbox/a.gpkg") == "team-a/inbox/a.gpkg"
    assert ROOT.uri_of("warehouse/x/a.parquet") == "s3://geo/team-a/warehouse/x/a.parquet"
    assert ROOT.relative("team-a/inbox/a.gpkg") == "inbox/a.gpkg"
    for outside in ("team-ab/inbox/a.gpkg", "team-b/a", "team-a/../team-b/a", "team-a/", "x"):
        with pytest.raises(UnsafeNameError, match="outside the data root s3://geo/team-a"):
            ROOT.relative(outside)
    for bad in ("../team-b/a", "inbox//a", "", "inbox/./a"):
        with pytest.raises(UnsafeNameError):
            ROOT.key(bad)


def test_a_bad_root_stops_the_cli_and_the_code_location_instead_of_a_local_folder(tmp_path):
    env = {**os.environ, "GEOISO_DATA_ROOT": "s3:/geo/team-a", "DAGSTER_HOME": str(tmp_path)}
    added = subprocess.run(
        [BIN / "geoiso", "add", str(Path("data/sample/countries.gpkg").resolve())],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 2
    assert "is not of the form s3://bucket/prefix" in added.stderr
    assert "Traceback" not in added.stderr
    loaded = subprocess.run(
        [sys.executable, "-c", "import geoiso_dagster.definitions"],
        env={**env, "GEOISO_DATA_ROOT": "gs://geo/team-a"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert loaded.returncode != 0
    assert "scheme 'gs' is not supported; use a local folder or s3://bucket/prefix" in (
        loaded.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written as a folder"


def test_the_object_stores_answers_map_onto_the_failure_table(s3_root, tmp_path):
    # A key that is not there: bad input naming it, not retried.
    with pytest.raises(BadInputError, match="does not exist") as missing:
        objectstore.head(ROOT, "team-a/inbox/gone.gpkg")
    assert missing.value.path == "s3://geo/team-a/inbox/gone.gpkg"
    # No such bucket: a named, non-retried failure.
    with pytest.raises(StorageAccessError, match="the bucket 'nope' does not exist") as no_bucket:
        objectstore.check_bucket(objectstore.S3Root("nope", "x"))
    assert not no_bucket.value.retryable
    # The endpoint unreachable: transient.
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TransientIOError, match="S3 endpoint unreachable") as away:
        objectstore.check_bucket(ROOT)
    assert away.value.retryable


def test_5xx_during_an_upload_is_transient_and_403_is_named_without_the_secret(
    s3_root, tmp_path, monkeypatch
):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 2**20))
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 2**20)
    uploads = FaultyProxy(
        s3_root.server.endpoint, lambda method, path: method == "PUT" and "partNumber=2" in path, 9
    )
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", uploads.endpoint)
        with pytest.raises(
            TransientIOError, match=r"S3 service failed \(InternalError, HTTP 500\)"
        ):
            objectstore.upload(ROOT, big, "team-a/warehouse/x/.big.tmp-1")
        assert uploads.failed == 3, "the client's own 3 attempts, then ours to decide"
        # Aborted: nothing visible, no upload left open.
        assert open_uploads(s3_root.client, "geo") == []
        assert "Contents" not in s3_root.client.list_objects_v2(Bucket="geo")
        # The outage passes: the next attempt (the step's retry) uploads it whole.
        uploads.state["left"] = 1
        info = objectstore.upload(ROOT, big, "team-a/warehouse/x/big.bin")
        assert info.size == big.stat().st_size
        body = s3_root.client.get_object(Bucket="geo", Key="team-a/warehouse/x/big.bin")["Body"]
        assert body.read() == big.read_bytes()
    finally:
        uploads.stop()

    strict = S3Server(tmp_path / "strict-moto.log", enforce_auth=True)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        with pytest.raises(StorageAccessError) as denied:
            objectstore.check_bucket(ROOT)
        message = str(denied.value)
        assert "access denied by the bucket 'geo'" in message and "HTTP 403" in message
        assert SECRET_KEY not in message and ACCESS_KEY not in message
        assert not denied.value.retryable
    finally:
        strict.stop()


def _put(client, key: str, body: bytes = b"x") -> None:
    client.put_object(Bucket="geo", Key=f"team-a/{key}", Body=body)


def test_the_bucket_inbox_lists_every_page_and_applies_the_local_rules(s3_root, naturalearth_shp):
    client = s3_root.client
    for n in range(1030):  # more than a page (1,000 keys)
        _put(client, f"inbox/f{n:04d}.geojson", b"{}")
    for part in naturalearth_shp.parent.glob("naturalearth_lowres.*"):
        if part.suffix != ".dbf":
            _put(client, f"inbox/{part.name}", part.read_bytes())
    _put(client, "inbox/a.gpkg", b"gpkg")
    _put(client, "inbox/a.gpkg.geoiso.json", b'{"target_crs": "EPSG:6933"}')
    _put(client, "inbox/b.gpkg", b"gpkg")
    _put(client, "inbox/b.gpkg.geoiso.json", b'{"target_crs": "+init=epsg:4326"}')
    _put(client, "inbox/.hidden.gpkg", b"x")
    _put(client, "inbox/sub/c.gpkg", b"x")  # a sub-folder is not the inbox
    _put(client, "other/d.gpkg", b"x")  # outside the inbox

    later = time.time() + 60
    rules = sidecar_rules(geo_assets)  # what the built-in steps let a sidecar set
    scan = inbox.scan(settle_s=5, now=later, rules=rules)
    ready = {f.key: f for f in scan.ready}
    assert len(ready) == 1031 and "a.gpkg" in ready and "f1029.geojson" in ready
    assert ready["a.gpkg"].run_config == {
        "ops": {"reprojected_features": {"config": {"target_crs": "EPSG:6933"}}}
    }
    assert scan.waiting == {"naturalearth_lowres.shp": "shapefile waits for its .dbf"}
    assert "uses +init=" in scan.refused["b.gpkg"]
    assert ".hidden.gpkg" not in ready and "c.gpkg" not in ready and "d.gpkg" not in ready

    # Settling: a fresh object waits; its fingerprint follows its content (the ETag).
    assert "changed" in inbox.scan(settle_s=5, rules=rules).waiting["a.gpkg"]
    seen = {"a.gpkg": ready["a.gpkg"].fingerprint}
    again = inbox.scan(settle_s=5, now=later, seen=seen, rules=rules)
    assert "a.gpkg" in again.seen_again and "a.gpkg" not in {f.key for f in again.ready}
    _put(client, "inbox/a.gpkg", b"gpkg, delivered again")
    changed = inbox.scan(settle_s=0, now=time.time() + 1, seen=seen, rules=rules)
    assert ready["a.gpkg"].fingerprint != {f.key: f for f in changed.ready}["a.gpkg"].fingerprint
    # With a cursor, what did not change since is counted, not looked at.
    assert inbox.scan(settle_s=0, since=time.time() + 5).unchanged == 1033


def test_staged_objects_and_uploads_of_dead_writers_are_swept(s3_root, monkeypatch):
    client = s3_root.client
    tag = fsutil.host_tag()
    dead = _dead_pid()
    folder = "team-a/warehouse/raw_features"
    names = {
        "dead here": f".a.gpkg.parquet.tmp-{dead}@{tag}-0001",
        "alive here": f".a.gpkg.parquet.tmp-{os.getpid()}@{tag}-0002",
        "other host": f".a.gpkg.parquet.tmp-{os.getpid()}@elsewhere.abcdef-0003",
        "another file": f".b.gpkg.parquet.tmp-{dead}@{tag}-0004",
    }
    for name in names.values():
        client.put_object(Bucket="geo", Key=f"{folder}/{name}", Body=b"partial")
    client.put_object(Bucket="geo", Key=f"{folder}/a.gpkg.parquet", Body=b"published")
    upload_key = f"{folder}/.a.gpkg.parquet.tmp-{dead}@{tag}-0005"
    client.create_multipart_upload(Bucket="geo", Key=upload_key)

    swept = objectstore.sweep_staged(ROOT, f"{folder}/a.gpkg.parquet")
    left = {k.rpartition("/")[2] for k in _keys(client)}
    assert f"{folder}/{names['dead here']}" in swept
    assert names["dead here"] not in left
    assert {names["alive here"], names["other host"], names["another file"]} <= left
    assert "a.gpkg.parquet" in left
    assert open_uploads(client, "geo") == []
    # Another host's staged object goes once nothing wrote it for the lease.
    monkeypatch.setenv(fsutil.LEASE_ENV, "0")
    objectstore.sweep_staged(ROOT, f"{folder}/a.gpkg.parquet")
    assert names["other host"] not in {k.rpartition("/")[2] for k in _keys(client)}


def _keys(client) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket="geo").get("Contents", [])]


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_mirror_folder_others_could_write_is_refused(tmp_path, monkeypatch):
    """Workers trust the mirror: a planted link or a shared folder there is refused."""
    monkeypatch.setenv("GEOISO_DATA_ROOT", "s3://geo/team-a")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("GEOISO_SCRATCH_DIR", str(shared))
    with pytest.raises(dataroot.DataRootError, match="may be written by others"):
        paths.data_root()
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    (tmp_path / "planted").symlink_to(elsewhere)
    monkeypatch.setenv("GEOISO_SCRATCH_DIR", str(tmp_path / "planted"))
    with pytest.raises(dataroot.DataRootError, match="is a symbolic link"):
        paths.data_root()
    monkeypatch.setenv("GEOISO_SCRATCH_DIR", str(tmp_path / "mine"))
    mirror = paths.data_root()
    assert mirror.parent == tmp_path / "mine"
    assert stat.S_IMODE(mirror.stat().st_mode) == 0o700
    assert stat.S_IMODE(mirror.parent.stat().st_mode) == 0o700


def test_the_mirror_fetches_a_source_with_its_parts_once_per_version(s3_root, naturalearth_shp):
    from geoiso_dagster.spatial import transfer

    client = s3_root.client
    parts = {p.suffix: p for p in naturalearth_shp.parent.glob(f"{naturalearth_shp.stem}.*")}
    for suffix, part in parts.items():
        _put(client, f"inbox/countries{suffix}", part.read_bytes())
    _put(client, "inbox/countries_other.dbf", b"not a part of countries.shp")
    first = transfer.fetch("inbox/countries.shp", source=True)
    assert sorted(first["fetched"]) == sorted(f"countries{s}" for s in parts)
    inbox_copy = paths.data_root() / "inbox"
    for suffix, part in parts.items():
        assert (inbox_copy / f"countries{suffix}").read_bytes() == part.read_bytes()
    assert not (inbox_copy / "countries_other.dbf").exists()
    assert transfer.fetch("inbox/countries.shp", source=True)["fetched"] == []

    # A new version of one part, another part gone from the bucket: the mirror follows.
    _put(client, "inbox/countries.dbf", parts[".dbf"].read_bytes() + b"\x1a")
    client.delete_object(Bucket="geo", Key="team-a/inbox/countries.prj")
    third = transfer.fetch("inbox/countries.shp", source=True)
    assert third["fetched"] == ["countries.dbf"]
    assert not (inbox_copy / "countries.prj").exists()
    assert (inbox_copy / "countries.dbf").read_bytes().endswith(b"\x1a")

    # A GeoPackage with changes still in its SQLite log is refused, as locally.
    _put(client, "inbox/a.gpkg", b"gpkg")
    _put(client, "inbox/a.gpkg-wal", b"pending pages")
    with pytest.raises(BadInputError, match="un-checkpointed changes"):
        transfer.fetch("inbox/a.gpkg", source=True)
    with pytest.raises(UnsafeNameError):
        transfer.fetch("../team-b/inbox/a.gpkg", source=True)
