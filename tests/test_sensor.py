"""The inbox sensor through build_sensor_context on a real (temporary) instance."""

import json
import os
import time

import pytest
from dagster import build_sensor_context, instance_for_test

from geoiso_dagster.definitions import defs
from geoiso_dagster.defs import sensors
from geoiso_dagster.defs.assets import BATCH_MAX_FILES
from geoiso_dagster.defs.partitions import source_files

SENSOR = defs.resolve_sensor_def("inbox_sensor")


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


@pytest.fixture(autouse=True)
def no_settle(monkeypatch):
    monkeypatch.setenv("GEOISO_INBOX_SETTLE_S", "0")


def tick(instance, cursor=None):
    context = build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    return SENSOR(context)


def test_new_file_then_same_file_then_changed_file(data_root, instance):
    source = data_root / "inbox" / "parcels.gpkg"
    source.write_bytes(b"first version")

    first = tick(instance)
    assert [r.partition_key for r in first.run_requests] == ["parcels.gpkg"]
    assert first.run_requests[0].job_name in (None, "geo_pipeline")
    assert instance.has_dynamic_partition(source_files.name, "parcels.gpkg")

    again = tick(instance, first.cursor)
    assert again.run_requests == []

    source.write_bytes(b"second, longer version")
    changed = tick(instance, again.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["parcels.gpkg"]
    assert changed.run_requests[0].run_key != first.run_requests[0].run_key
    assert instance.get_dynamic_partitions(source_files.name) == ["parcels.gpkg"]


def test_hidden_temporary_and_unsettled_files_wait(data_root, instance, monkeypatch):
    inbox = data_root / "inbox"
    (inbox / ".hidden.gpkg").write_bytes(b"x")
    (inbox / "download.gpkg.part").write_bytes(b"x")
    (inbox / "copying.gpkg.tmp").write_bytes(b"x")
    assert tick(instance).run_requests == []

    monkeypatch.setenv("GEOISO_INBOX_SETTLE_S", "30")
    (inbox / "fresh.gpkg").write_bytes(b"x")
    result = tick(instance)
    assert result.run_requests == []
    assert "fresh.gpkg" in result.skip_reason.skip_message


def test_shapefile_waits_for_its_sidecars(data_root, instance, naturalearth_shp, copy_shapefile):
    inbox = data_root / "inbox"
    shp = copy_shapefile(naturalearth_shp, inbox, skip=(".dbf", ".shx"), name="countries")
    result = tick(instance)
    assert result.run_requests == []
    assert ".shx" in result.skip_reason.skip_message
    copy_shapefile(naturalearth_shp, inbox, name="countries")
    result = tick(instance, result.cursor)
    assert [r.partition_key for r in result.run_requests] == [shp.name]


def test_sidecar_settings_become_run_config(data_root, instance):
    inbox = data_root / "inbox"
    (inbox / "a.gpkg").write_bytes(b"x")
    (inbox / "a.gpkg.geoiso.json").write_text(
        json.dumps({"target_crs": "EPSG:6933", "dissolve_by": "continent"})
    )
    (request,) = tick(instance).run_requests
    assert request.run_config == {
        "ops": {
            "reprojected_features": {"config": {"target_crs": "EPSG:6933"}},
            "dissolved_regions": {"config": {"dissolve_by": "continent"}},
        }
    }


def test_bad_sidecar_and_unsafe_name_are_refused_once(data_root, instance, monkeypatch):
    inbox = data_root / "inbox"
    (inbox / "b.gpkg").write_bytes(b"x")
    (inbox / "b.gpkg.geoiso.json").write_text(json.dumps({"target_srs": "EPSG:3857"}))
    (inbox / "bad,name.gpkg").write_bytes(b"x")
    first = tick(instance)
    assert first.run_requests == []
    message = first.skip_reason.skip_message
    assert "b.gpkg.geoiso.json: unknown settings ['target_srs']" in message
    assert "bad,name.gpkg" in message
    # Once the clock margin has passed, unchanged files are not looked at (nor reported)
    # again: the cursor says they were handled.
    monkeypatch.setattr(sensors, "CLOCK_MARGIN_S", 0.0)
    time.sleep(0.05)
    second = tick(instance, first.cursor)
    third = tick(instance, second.cursor)
    assert "b.gpkg" not in third.skip_reason.skip_message
    assert "(2 unchanged)" in third.skip_reason.skip_message


def test_symlink_out_of_the_data_root_is_refused(data_root, instance, tmp_path):
    outside = tmp_path / "secret.gpkg"
    outside.write_bytes(b"x")
    (data_root / "inbox" / "link.gpkg").symlink_to(outside)
    result = tick(instance)
    assert result.run_requests == []
    assert "link.gpkg: is a link to" in result.skip_reason.skip_message
    assert "outside the data root" in result.skip_reason.skip_message


def _covered(instance, request) -> list[str]:
    """The partition keys a run request covers: its one key, or its range's keys."""
    if request.partition_key:
        return [request.partition_key]
    keys = instance.get_dynamic_partitions(source_files.name)
    start, end = request.tags[sensors.RANGE_START], request.tags[sensors.RANGE_END]
    return keys[keys.index(start) : keys.index(end) + 1]


def test_files_of_one_tick_travel_in_batches_each_file_once(data_root, instance):
    inbox = data_root / "inbox"
    names = [f"tile_{i:03d}.gpkg" for i in range(250)]
    for name in names:
        (inbox / name).write_bytes(b"x")
    # Settings of their own: a run alone. A large file: a run alone (sparse, no disk used).
    (inbox / "tile_007.gpkg.geoiso.json").write_text(json.dumps({"target_crs": "EPSG:6933"}))
    with open(inbox / "tile_100.gpkg", "wb") as big:
        big.truncate(sensors.BATCH_MAX_FILE_BYTES)
    result = tick(instance)
    assert instance.get_dynamic_partitions(source_files.name) == names
    covered = [_covered(instance, r) for r in result.run_requests]
    assert sorted(k for keys in covered for k in keys) == names  # every file exactly once
    alone = sorted(keys[0] for keys in covered if len(keys) == 1)
    assert alone == ["tile_007.gpkg", "tile_100.gpkg"]
    batches = [r for r in result.run_requests if not r.partition_key]
    sizes = sorted(int(r.tags[sensors.BATCH_TAG]) for r in batches)
    assert sum(sizes) == 248 and max(sizes) <= BATCH_MAX_FILES
    # 248 files: 2 batches' worth (at most BATCH_MAX_FILES each, a multiple of the 2 run
    # slots) of 124; the two files that run alone cut the range in three.
    assert BATCH_MAX_FILES == 125 and sizes == [7, 25, 92, 124], sizes
    (own,) = [r for r in result.run_requests if r.partition_key == "tile_007.gpkg"]
    assert own.run_config["ops"]["reprojected_features"]["config"]["target_crs"] == "EPSG:6933"
    assert len({r.run_key for r in result.run_requests}) == len(result.run_requests)


def test_changed_files_run_again_with_their_neighbours(data_root, instance, monkeypatch):
    monkeypatch.setattr(sensors, "CLOCK_MARGIN_S", 0.0)
    inbox = data_root / "inbox"
    for i in range(5):
        (inbox / f"d{i}.gpkg").write_bytes(b"x")
    first = tick(instance)
    time.sleep(0.05)
    for i in (1, 2, 4):
        (inbox / f"d{i}.gpkg").write_bytes(b"changed")
    second = tick(instance, first.cursor)
    # Three files, two run slots: a batch of the neighbours d1, d2 (a range), and d4.
    covered = [_covered(instance, r) for r in second.run_requests]
    assert covered == [["d1.gpkg", "d2.gpkg"], ["d4.gpkg"]]


def test_a_file_listed_late_but_stamped_early_is_not_lost(data_root, instance, monkeypatch):
    """A file written while a tick runs can carry a time from before the tick read the
    clock (file times come from a coarse clock): the next tick still takes it, once."""
    inbox = data_root / "inbox"
    (inbox / "early.gpkg").write_bytes(b"x")
    (inbox / "late.gpkg").write_bytes(b"x")  # stamped now, before the tick below
    real_scan = sensors.inbox.scan

    def scan_before_late_arrived(**kwargs):
        found = real_scan(**kwargs)
        found.ready = [item for item in found.ready if item.key != "late.gpkg"]
        return found

    monkeypatch.setattr(sensors.inbox, "scan", scan_before_late_arrived)
    first = tick(instance)
    assert [r.partition_key for r in first.run_requests] == ["early.gpkg"]
    monkeypatch.setattr(sensors.inbox, "scan", real_scan)
    second = tick(instance, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["late.gpkg"]
    third = tick(instance, second.cursor)
    assert third.run_requests == []


def test_the_cursor_does_not_grow_with_the_files_seen(data_root, instance, monkeypatch):
    monkeypatch.setattr(sensors, "CLOCK_MARGIN_S", 0.0)
    inbox = data_root / "inbox"
    (inbox / "first.gpkg").write_bytes(b"x")
    cursor = tick(instance).cursor
    small = len(cursor)
    for round_ in range(3):
        for i in range(300):
            (inbox / f"r{round_}_{i:03d}.gpkg").write_bytes(b"x")
        time.sleep(0.05)
        result = tick(instance, cursor)
        assert len(result.run_requests) >= 2
        time.sleep(0.05)
        cursor = tick(instance, result.cursor).cursor
    assert len(cursor) <= small + 10, cursor  # 901 files seen; the cursor is still one mark
    assert json.loads(cursor)["recent"] == {}


def test_a_file_moved_in_with_an_old_time_is_taken(data_root, instance, tmp_path, monkeypatch):
    monkeypatch.setattr(sensors, "CLOCK_MARGIN_S", 0.0)
    first = tick(instance)
    time.sleep(0.05)
    outside = tmp_path / "archive.gpkg"
    outside.write_bytes(b"x")
    os.utime(outside, (946684800, 946684800))  # written in 2000
    outside.rename(data_root / "inbox" / "archive.gpkg")  # moving keeps the file's mtime
    second = tick(instance, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["archive.gpkg"]


def test_a_cursor_of_an_earlier_version_starts_afresh(data_root, instance):
    """The first cursor format (every name ever seen with its fingerprint) is no longer
    read: the tick looks at the inbox as if for the first time and writes its own."""
    (data_root / "inbox" / "parcels.gpkg").write_bytes(b"first version")
    fresh = tick(instance)
    old = json.dumps({"parcels.gpkg": fresh.run_requests[0].run_key.split("@")[1]})
    again = tick(instance, old)
    assert [r.run_key for r in again.run_requests] == [fresh.run_requests[0].run_key]
    assert json.loads(again.cursor)["version"] == sensors._CURSOR_VERSION


def test_a_file_dropped_after_the_clock_went_back_is_taken(data_root, instance):
    """The clock stepped back an hour after a tick: a file dropped since carries a time
    before the cursor's mark, and was never taken. The cursor says when it was written;
    one from the future is read as none, so the tick looks at every file once (the file
    run before keeps its run key: Dagster does not run it again)."""
    inbox = data_root / "inbox"
    (inbox / "before.gpkg").write_bytes(b"x")
    first = tick(instance)
    (before,) = first.run_requests
    stepped = json.loads(first.cursor)
    stepped["mark"] += 3600  # as the ticks before the step wrote it, an hour ahead
    stepped["at"] += 3600
    (inbox / "after.gpkg").write_bytes(b"x")
    taken = tick(instance, json.dumps(stepped))
    by_key = {r.partition_key: r.run_key for r in taken.run_requests}
    assert "after.gpkg" in by_key, taken.run_requests
    assert by_key.get("before.gpkg", before.run_key) == before.run_key
    assert json.loads(taken.cursor)["at"] <= time.time()
