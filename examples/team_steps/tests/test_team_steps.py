"""The example materialized as a team would: `geoiso add`, then the real `dagster asset
materialize` of its code location, the outputs compared with geopandas' own answer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas
import pytest

HERE = Path(__file__).resolve().parents[1]  # examples/team_steps
SAMPLE = HERE.parents[1] / "data" / "sample" / "countries.gpkg"
BIN = Path(sys.executable).parent
STEPS = "raw_features,reprojected_features,dissolved_regions,clipped_countries,regions_with_places"


@pytest.fixture
def env(tmp_path):
    root, home = tmp_path / "data", tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {
        **os.environ,
        "GEOISO_DATA_ROOT": str(root),
        "DAGSTER_HOME": str(home),
        # The team's package, importable by the run process and its workers (installed
        # with pip in a real project).
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }


def _run(env, *command, timeout=300):
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_example_clips_countries_and_joins_places_through_the_cli(env):
    root = Path(env["GEOISO_DATA_ROOT"])
    _run(env, sys.executable, "-m", "team_steps.reference", "--crs", "EPSG:6933")
    (key,) = _run(env, BIN / "geoiso", "add", str(SAMPLE)).split()
    config = {
        "ops": {
            "reprojected_features": {"config": {"target_crs": "EPSG:6933"}},
            "dissolved_regions": {"config": {"dissolve_by": "continent"}},
        }
    }
    _run(
        env,
        BIN / "dagster",
        "asset",
        "materialize",
        "-m",
        "team_steps.definitions",
        "--select",
        STEPS,
        "--partition",
        key,
        "--config-json",
        json.dumps(config),
    )
    warehouse = root / "warehouse"
    countries = geopandas.read_parquet(warehouse / "reprojected_features" / f"{key}.parquet")
    mask = geopandas.read_parquet(root / "reference" / "mask.parquet")
    clipped = geopandas.read_parquet(warehouse / "clipped_countries" / f"{key}.parquet")
    # In EPSG:6933 a few of Natural Earth's countries are invalid: the step repairs them
    # (make_valid) before cutting, as GEOS cannot cut them otherwise.
    assert (~countries.is_valid).sum() > 0
    expected = geopandas.clip(countries.set_geometry(countries.make_valid()), mask)
    assert clipped.crs == countries.crs and len(clipped) == len(expected) > 50
    assert clipped.area.sum() == pytest.approx(expected.area.sum(), rel=1e-9)
    assert sorted(clipped["name"]) == sorted(expected["name"])

    regions = geopandas.read_parquet(warehouse / "regions_with_places" / f"{key}.parquet")
    places = geopandas.read_parquet(root / "reference" / "places.parquet")
    within = geopandas.sjoin(places, regions[["continent", "geometry"]], predicate="within")
    counted = dict(zip(regions["continent"], regions["places"], strict=True))
    assert counted == {c: int((within["continent"] == c).sum()) for c in regions["continent"]}
    assert counted["Europe"] == 4 and counted["Africa"] == 2  # Berlin, Madrid, Paris, Warsaw
    europe = regions.loc[regions["continent"] == "Europe", "place_names"].item()
    assert europe == "Berlin, Madrid, Paris, Warsaw"
    shutil.rmtree(root / "warehouse")
