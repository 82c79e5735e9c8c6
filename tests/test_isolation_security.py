"""The data root is a jail: no key, setting or symlink reads or writes outside it."""

import contextlib
import json
import shutil

import pytest
from dagster import DagsterEventType, instance_for_test, materialize

from geoiso_dagster.defs.assets import geo_assets
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.steps import sidecar_rules
from geoiso_dagster.errors import BadInputError, UnsafeNameError
from geoiso_dagster.inbox import read_sidecar
from geoiso_dagster.paths import output_path
from geoiso_dagster.settings import check_aggregations, check_target_crs
from tests.harness.runs import retries


def _run(key: str, config=None):
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(source_files.name, [key])
        result = materialize(
            geo_assets,
            instance=instance,
            partition_key=key,
            run_config=config,
            resources={"spatial_pool": SpatialWorkerPool(max_workers=1)},
            raise_on_error=False,
        )
        failures = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
        return result, failures, retries(instance, result)


@pytest.mark.parametrize(
    "value",
    [
        "+init=epsg:4326",
        "+proj=longlat +nadgrids=/etc/passwd",
        "+proj=longlat +geoidgrids=@./x.gtx",
        "+proj=longlat +nadgrids=~/grid.gsb",
        "C:\\grids\\x.gsb",
        "+proj=longlat +ellps=GRS80 +nadgrids=@x,/abs/path/grid.gsb",
        'GEOGCS["x",EXTENSION["PROJ4","+proj=longlat +nadgrids=/tmp/fifo.gsb"]]',
        '{"type": "BoundCRS", "transformation": {"parameters": [{"parameter_file": "/x"}]}}',
        "[" * 15_000 + "]" * 15_000,
        "",
        "x" * 20_001,
    ],
)
def test_crs_settings_that_name_files_are_refused(value):
    with pytest.raises(BadInputError, match="target_crs"):
        check_target_crs(value)


@pytest.mark.parametrize(
    "value",
    ["EPSG:6933", "+proj=laea +lat_0=52 +lon_0=10 +ellps=GRS80 +nadgrids=@null", "OGC:CRS84"],
)
def test_ordinary_crs_settings_pass(value):
    assert check_target_crs(value) == value


def test_every_form_pyproj_writes_of_epsg_crs_passes_the_crs_rules():
    """Sources are held to the target_crs rules (spatial/declared.py), so the rules must
    not refuse what writers put in files: every 20th CRS of PROJ's EPSG database, as WKT2,
    WKT1 (GDAL and ESRI flavours), PROJJSON and, where one exists, a PROJ string."""
    import warnings

    import pyproj
    from pyproj.database import query_crs_info

    refused, checked = [], 0
    for info in query_crs_info(auth_name="EPSG")[::20]:
        crs = pyproj.CRS.from_epsg(int(info.code))
        forms = [crs.to_json(), crs.to_wkt()]
        for version in ("WKT1_GDAL", "WKT1_ESRI"):
            with contextlib.suppress(pyproj.exceptions.CRSError):
                forms.append(crs.to_wkt(version))
        with warnings.catch_warnings(), contextlib.suppress(pyproj.exceptions.CRSError):
            warnings.simplefilter("ignore")
            forms.append(crs.to_proj4())
        for text in filter(None, forms):
            checked += 1
            with contextlib.suppress(BadInputError):
                check_target_crs(text)
                continue
            refused.append((info.code, text[:60]))
    assert checked > 1000 and refused == []


def test_aggregations_are_an_allow_list():
    check_aggregations("first", {"pop": "sum"})
    for bad in ("to_csv", "apply", "__class__", "plot"):
        with pytest.raises(BadInputError, match="not one of"):
            check_aggregations(bad, {})
        with pytest.raises(BadInputError, match="not one of"):
            check_aggregations("first", {"pop": bad})


def test_sidecar_settings_are_checked(tmp_path):
    source = tmp_path / "a.gpkg"
    source.write_bytes(b"x")
    sidecar = tmp_path / "a.gpkg.geoiso.json"
    sidecar.write_text(json.dumps({"target_crs": "+init=/etc/passwd"}))
    with pytest.raises(BadInputError, match="init"):
        read_sidecar(source, sidecar_rules(geo_assets))
    sidecar.write_text(json.dumps({"aggfunc": "to_pickle"}))
    with pytest.raises(BadInputError, match="not one of"):
        read_sidecar(source, sidecar_rules(geo_assets))


def test_a_symlinked_source_outside_the_root_fails_the_step(data_root, tmp_path):
    outside = tmp_path / "elsewhere" / "secret.gpkg"
    outside.parent.mkdir()
    shutil.copy("data/sample/countries.gpkg", outside)
    (data_root / "inbox" / "link.gpkg").symlink_to(outside)
    result, failures, retries = _run("link.gpkg")
    assert not result.success and retries == []
    assert "outside the data root" in failures[0].step_failure_data.user_failure_data.description
    assert not (data_root / "warehouse").exists()


def test_a_symlinked_warehouse_folder_is_never_written_through(data_root, tmp_path):
    outside = tmp_path / "not_the_warehouse"
    outside.mkdir()
    (data_root / "warehouse").mkdir()
    (data_root / "warehouse" / "raw_features").symlink_to(outside)
    with pytest.raises(UnsafeNameError, match="outside the data root"):
        output_path("raw_features", "countries.gpkg")
    shutil.copy("data/sample/countries.gpkg", data_root / "inbox" / "countries.gpkg")
    result, failures, _ = _run("countries.gpkg")
    assert not result.success
    assert list(outside.iterdir()) == []


def test_a_bad_config_value_is_a_clear_non_retried_failure(data_root):
    shutil.copy("data/sample/countries.gpkg", data_root / "inbox" / "countries.gpkg")
    config = {"ops": {"reprojected_features": {"config": {"target_crs": "+init=/etc/x:1"}}}}
    result, failures, retries = _run("countries.gpkg", config)
    assert not result.success and retries == []
    (failure,) = failures
    assert failure.step_key == "reprojected_features"
    assert "Bad config" in failure.step_failure_data.user_failure_data.description


def _two_layer_gpkg(path):
    import geopandas
    from shapely.geometry import box

    frame = geopandas.GeoDataFrame(
        {"region_id": [1, 1, 2]}, geometry=[box(0, 0, 1, 1), box(1, 0, 2, 1), box(5, 5, 6, 6)]
    ).set_crs(4326)
    frame.iloc[:1].to_file(path, layer="small")
    frame.to_file(path, layer="large")


def test_a_file_with_several_layers_needs_one_named(data_root):
    _two_layer_gpkg(data_root / "inbox" / "two.gpkg")
    result, failures, retries = _run("two.gpkg")
    assert not result.success and retries == []
    (failure,) = failures
    assert failure.step_key == "raw_features"
    description = failure.step_failure_data.user_failure_data.description
    assert "has 2 layers: 'small' (1 features), 'large' (3 features)" in description
    assert not (data_root / "warehouse" / "raw_features" / "two.gpkg.parquet").exists()

    config = {"ops": {"raw_features": {"config": {"layer": "large"}}}}
    result, failures, _ = _run("two.gpkg", config)
    assert result.success and failures == []
    checks = [e for e in result.get_asset_check_evaluations()]
    assert checks and all(c.passed for c in checks)
    (raw,) = [c for c in checks if c.asset_key.to_user_string() == "raw_features"]
    for criterion in ("counts_match_source", "coordinates_in_crs_range"):
        assert raw.metadata[criterion].value["passed"] is True, criterion
    rows = result.asset_materializations_for_node("dissolved_regions")[0].metadata
    assert rows["dagster/row_count"].value == 2
