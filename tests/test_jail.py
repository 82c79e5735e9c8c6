"""The data-root jail beyond single files: drivers and network in real workers, the sensor
and `geoiso add` facing hostile sidecars, and names at the file system's limits."""

import contextlib
import http.server
import json
import os
import sqlite3
import threading
from pathlib import Path

import geopandas
import pyarrow.parquet as pq
import pytest
from dagster import build_sensor_context, instance_for_test
from shapely.geometry import box

from geoiso_dagster import cli
from geoiso_dagster.definitions import defs
from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.assets import geo_assets
from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.defs.steps import sidecar_rules
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.formats import ALLOWED_GDAL_DRIVERS
from geoiso_dagster.fsutil import temp_path_for
from geoiso_dagster.inbox import scan as inbox_scan
from geoiso_dagster.paths import output_path
from geoiso_dagster.pool import PoolSettings, WorkerPool

SENSOR = defs.resolve_sensor_def("inbox_sensor")


class _CountingServer:
    """An HTTP server on 127.0.0.1 that counts the requests it gets."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b'{"type": "FeatureCollection", "features": []}')

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_server():
    server = _CountingServer()
    yield server
    server.close()


def _vrt(path: Path, source: str) -> Path:
    path.write_text(
        '<OGRVRTDataSource><OGRVRTLayer name="x"><SrcDataSource>'
        f"{source}</SrcDataSource></OGRVRTLayer></OGRVRTDataSource>"
    )
    return path


def test_workers_keep_only_the_allowed_drivers_and_no_network(data_root):
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=1)) as pool:
        facts = pool.run("environment").facts
    assert set(facts["gdal_drivers"]) == ALLOWED_GDAL_DRIVERS
    assert facts["proj_network"] is False


def test_a_vrt_to_a_url_sends_no_request_and_the_test_can_tell(data_root, http_server):
    url = f"/vsicurl/{http_server.url}/x.geojson"
    source = _vrt(data_root / "inbox" / "remote.gpkg", url)
    output = data_root / "warehouse" / "raw.parquet"
    allow_url = {"CPL_VSIL_CURL_ALLOWED_FILENAME": url}
    # The first layer: the content is not the suffix's format, so GDAL never sees it.
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=1)) as pool:
        with pytest.raises(BadInputError, match="its content is not GPKG data"):
            pool.run("ingest", source=str(source), output=str(output))
    assert http_server.hits == [] and not output.exists()
    # The layers under it, each alone: GDAL itself opens the file in the worker.
    probe = "tests.standins.pool_tasks:gdal_read_info"
    layers = [
        ({}, "not recognized"),  # both: the VRT driver is gone
        ({"allowed_gdal_drivers": None}, "Failed to open datasource"),  # the network switch
        ({"env_overrides": allow_url}, "not recognized"),  # the driver allow-list
    ]
    for settings, cause in layers:
        with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=1, **settings)) as pool:
            with pytest.raises(BadInputError, match=cause):
                pool.run(probe, path=str(source))
        assert http_server.hits == [], settings
    # With both lifted (the URL explicitly allowed), the kernel's sandbox still holds: the
    # task's process may connect nowhere (docs/security.md).
    lifted = {"allowed_gdal_drivers": None, "env_overrides": allow_url}
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=1, **lifted)) as pool:
        # GDAL opens the VRT and finds its source unreachable (no layer, or no feature)
        with contextlib.suppress(BadInputError):
            pool.run(probe, path=str(source))
    assert http_server.hits == [], "the sandbox let the request out"
    # And with the sandbox off too, GDAL fetches it: this test would see a request.
    with WorkerPool(
        PoolSettings(task_module=TASK_MODULE, max_workers=1, sandbox="off", **lifted)
    ) as pool:
        with pytest.raises(BadInputError):  # the server's answer is no layer
            pool.run(probe, path=str(source))
    assert http_server.hits, "the unjailed worker should have reached the server"


def _tick(instance, cursor=None):
    result = SENSOR(build_sensor_context(instance=instance, cursor=cursor, definitions=defs))
    return result


def test_hostile_sidecars_refuse_only_their_own_files(data_root, monkeypatch, caplog):
    monkeypatch.setenv("GEOISO_INBOX_SETTLE_S", "0")
    inbox = data_root / "inbox"
    sample = Path("data/sample/countries.gpkg").read_bytes()
    sidecars = {
        "list_agg.gpkg": json.dumps({"aggregations": {"pop_est": ["sum"]}}),
        "deep.gpkg": "[" * 100_000 + "]" * 100_000,
        "deep_small.gpkg": "[" * 20_000 + "]" * 20_000,
        "wrong_type.gpkg": json.dumps({"target_crs": {"nested": 1}}),
        "grid.gpkg": json.dumps({"target_crs": "+proj=longlat +nadgrids=@x,/tmp/x.gsb"}),
    }
    for name, text in sidecars.items():
        (inbox / name).write_bytes(sample)
        (inbox / f"{name}.geoiso.json").write_text(text)
    (inbox / "fifo.gpkg").write_bytes(sample)
    os.mkfifo(inbox / "fifo.gpkg.geoiso.json")  # reading it would block the tick forever
    (inbox / "good.gpkg").write_bytes(sample)
    (inbox / "good.gpkg.geoiso.json").write_text(json.dumps({"layer": "countries"}))
    with instance_for_test() as instance:
        result = _tick(instance)
    (request,) = result.run_requests
    assert request.partition_key == "good.gpkg"
    assert request.run_config == {"ops": {"raw_features": {"config": {"layer": "countries"}}}}
    # The tick logs each refusal; the scan it made says why.
    refused = inbox_scan(settle_s=0, rules=sidecar_rules(geo_assets)).refused
    assert sorted(refused) == sorted([*sidecars, "fifo.gpkg"])
    assert "must be an object of text: text" in refused["list_agg.gpkg"]
    assert "at most 65536" in refused["deep.gpkg"]
    assert "nested too deeply" in refused["deep_small.gpkg"]
    assert "not a regular file" in refused["fifo.gpkg"]
    assert "names a file path" in refused["grid.gpkg"]


def _gpkg_with_pending_wal(path: Path) -> sqlite3.Connection:
    """A GeoPackage in WAL mode with a committed delete still in its -wal, as while QGIS
    edits it; the caller closes the connection (which checkpoints)."""
    frame = geopandas.GeoDataFrame({"a": [1, 2]}, geometry=[box(0, 0, 1, 1)] * 2, crs=4326)
    frame.to_file(path, layer="edited")
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("DELETE FROM edited WHERE fid = 2")
    db.commit()
    return db


def test_sensor_waits_for_a_geopackage_whose_wal_holds_changes(data_root, monkeypatch):
    monkeypatch.setenv("GEOISO_INBOX_SETTLE_S", "0")
    db = _gpkg_with_pending_wal(data_root / "inbox" / "edited.gpkg")
    try:
        with instance_for_test() as instance:
            waiting = _tick(instance)
            assert waiting.run_requests == []
            assert "SQLite WAL" in waiting.skip_reason.skip_message
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            assert [r.partition_key for r in _tick(instance, waiting.cursor).run_requests] == [
                "edited.gpkg"
            ]
    finally:
        db.close()


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def test_geoiso_add_refuses_what_is_not_a_source_and_bad_sidecars(
    data_root, dagster_home, tmp_path, capsys
):
    outside = tmp_path / "delivery"
    outside.mkdir()
    sample = Path("data/sample/countries.gpkg").read_bytes()
    (outside / "x.gpkg").write_bytes(sample)
    (outside / "x.gpkg.geoiso.json").write_text(json.dumps({"aggregations": {"a": ["sum"]}}))
    (outside / "y.gpkg.geoiso.json").write_text("{}")
    (outside / "z.csv").write_text("a\n1\n")
    cases = {
        "x.gpkg": "must be an object of text: text",
        "y.gpkg.geoiso.json": "is a settings sidecar",
        "z.csv": "is not on the allow-list",
    }
    for name, cause in cases.items():
        assert cli.main(["add", str(outside / name)]) == 2
        assert cause in capsys.readouterr().err, name
    assert list((data_root / "inbox").iterdir()) == []  # nothing copied, nothing registered
    with instance_for_test() as instance:
        assert instance.get_dynamic_partitions("source_files") == []


def test_geoiso_add_refuses_a_geopackage_whose_wal_would_be_left_behind(
    data_root, dagster_home, tmp_path, capsys
):
    path = tmp_path / "edited.gpkg"
    db = _gpkg_with_pending_wal(path)
    try:
        assert cli.main(["add", str(path)]) == 2
        assert "edited.gpkg-wal holds changes" in capsys.readouterr().err
        assert not (data_root / "inbox" / "edited.gpkg").exists()
    finally:
        db.close()


def test_temp_names_stay_under_the_file_system_limit_for_the_longest_key(tmp_path):
    key = "k" * 192 + ".parquet"  # 200 characters: the longest key paths accept
    target = tmp_path / f"{key}.parquet"
    chain = temp_path_for(temp_path_for(temp_path_for(target)))
    assert len(chain.name.encode()) < 255
    chain.write_bytes(b"x")  # the file system takes it
    assert chain.name.count(".tmp-") == 3  # every writer of the chain is still named


def test_a_200_character_key_fans_out_end_to_end(data_root, monkeypatch):
    """The probe's 195-character name failed once the file was big enough to fan out
    (ENAMETOOLONG on the temp of a temp); here every step fans out on a small file."""
    monkeypatch.setattr(fanout, "FAN_OUT_MIN_ROWS", 10)
    monkeypatch.setattr(fanout, "FAN_OUT_MIN_BYTES", 0)
    key = "k" * 192 + ".parquet"
    source = data_root / "inbox" / key
    frame = geopandas.GeoDataFrame(
        {"region_id": [i % 3 for i in range(60)]},
        geometry=[box(i, 0, i + 1, 1) for i in range(60)],
        crs="EPSG:3857",
    )
    frame.to_parquet(source, row_group_size=10)
    assert pq.ParquetFile(source).num_row_groups == 6
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=2)) as pool:
        runner = TaskRunner(pool)
        raw = output_path("raw_features", key)
        rep = output_path("reprojected_features", key)
        dis = output_path("dissolved_regions", key)
        for path in (raw, rep, dis):
            path.parent.mkdir(parents=True, exist_ok=True)
        facts = [
            fanout.ingest(runner, str(source), raw).facts,
            # The source, as raw_features is one row group (merged in Hilbert order).
            fanout.reproject(runner, str(source), rep, "EPSG:3857").facts,
            fanout.dissolve(runner, str(rep), dis, dissolve_by="region_id").facts,
        ]
    assert [f["rows"] for f in facts] == [60, 60, 3]
    assert all(f["fanned_out_over"] == 2 for f in facts)
    leftovers = [p for p in (data_root / "warehouse").rglob(".*")]
    assert leftovers == []


def test_a_source_swapped_for_a_link_after_its_check_is_read_as_checked(data_root, tmp_path):
    """The inbox name is swapped (atomically) for a link to a file outside the root right
    after the worker checked the source and before GDAL reads it (the `swap` fault, at the
    ingest's "pinned" point): the worker reads the file it opened and checked, never the
    one the name now points to; a second try, on the name as it now is, is refused."""
    good = data_root / "inbox" / "swap.geojson"
    geopandas.GeoDataFrame(
        {"marker": ["inside", "inside"]}, geometry=[box(0, 0, 1, 1), box(1, 0, 2, 1)], crs=4326
    ).to_file(good)
    outside = tmp_path / "outside" / "secret.geojson"
    outside.parent.mkdir()
    geopandas.GeoDataFrame({"marker": ["OUTSIDE"]}, geometry=[box(5, 5, 6, 6)], crs=4326).to_file(
        outside
    )
    link = data_root / "inbox" / ".swap-link"
    link.symlink_to(outside)
    fault = {
        "task": "ingest",
        "at": "pinned",
        "fault": "swap",
        "from": str(link),
        "path": str(good),
        "state": str(tmp_path / "fault-state"),
    }
    settings = PoolSettings(
        task_module=TASK_MODULE, max_workers=1, env_overrides={"GEOISO_FAULTS": json.dumps([fault])}
    )
    first, second = data_root / "warehouse" / "first.parquet", data_root / "warehouse" / "2.parquet"
    with WorkerPool(settings) as pool:
        result = pool.run("ingest", source=str(good), output=str(first))
        assert good.is_symlink() and good.resolve() == outside, "the swap did not happen"
        assert result.facts["rows"] == 2
        assert geopandas.read_parquet(first)["marker"].tolist() == ["inside", "inside"]
        with pytest.raises(BadInputError, match="is a link to .*, outside the data root"):
            pool.run("ingest", source=str(good), output=str(second))
    assert not second.exists()
    assert sorted(p.name for p in (data_root / "warehouse").iterdir()) == ["first.parquet"]
