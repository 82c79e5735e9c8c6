"""The inbox sensor through build_sensor_context on a real (temporary) instance."""

import json

import pytest
from dagster import build_sensor_context, instance_for_test

from geoiso_dagster.definitions import defs
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
    result = SENSOR(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    return result


def test_new_file_then_same_file_then_changed_file(data_root, instance):
    source = data_root / "inbox" / "parcels.gpkg"
    source.write_bytes(b"first version")

    first = tick(instance)
    assert [r.partition_key for r in first.run_requests] == ["parcels.gpkg"]
    assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["parcels.gpkg"]]
    assert first.run_requests[0].job_name in (None, "geo_pipeline")
    assert instance.has_dynamic_partition(source_files.name, "parcels.gpkg")

    again = tick(instance, first.cursor)
    assert again.run_requests == [] and not again.dynamic_partitions_requests

    source.write_bytes(b"second, longer version")
    changed = tick(instance, again.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["parcels.gpkg"]
    assert changed.run_requests[0].run_key != first.run_requests[0].run_key
    assert not changed.dynamic_partitions_requests  # the partition exists already


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


def test_bad_sidecar_and_unsafe_name_are_refused_once(data_root, instance):
    inbox = data_root / "inbox"
    (inbox / "b.gpkg").write_bytes(b"x")
    (inbox / "b.gpkg.geoiso.json").write_text(json.dumps({"target_srs": "EPSG:3857"}))
    (inbox / "bad,name.gpkg").write_bytes(b"x")
    first = tick(instance)
    assert first.run_requests == []
    cursor = json.loads(first.cursor)
    assert "unknown settings ['target_srs']" in cursor["b.gpkg"]
    assert "bad,name.gpkg" in cursor


def test_symlink_out_of_the_data_root_is_refused(data_root, instance, tmp_path):
    outside = tmp_path / "secret.gpkg"
    outside.write_bytes(b"x")
    (data_root / "inbox" / "link.gpkg").symlink_to(outside)
    result = tick(instance)
    assert result.run_requests == []
    assert "outside the data root" in json.loads(result.cursor)["link.gpkg"]
