"""The YAML component with the real `dg`: scaffolded into a project, checked, listed,
broken on purpose, and the example's pipeline materialized through the real CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas
import pytest
import shapely

from geoiso_dagster.spatial import io

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parents[1] / "data" / "sample" / "countries.gpkg"
BIN = Path(sys.executable).parent
COMPONENT = "geoiso_dagster.components.GeoPipeline"
BUILT_IN = {"raw_features", "reprojected_features", "dissolved_regions"}


@pytest.fixture
def project(tmp_path):
    """A copy of the example project (dg writes into it), with its own data root."""
    folder = tmp_path / "yaml_pipeline"
    shutil.copytree(HERE, folder, ignore=shutil.ignore_patterns("test_*", "__pycache__"))
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GEOISO_DATA_ROOT": str(tmp_path / "data"),
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
    }
    return folder, env


def _dg(project, *args, ok=True):
    folder, env = project
    done = subprocess.run(
        [BIN / "dg", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert (done.returncode == 0) == ok, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def _assets(project) -> dict:
    listed = json.loads(_dg(project, "list", "defs", "--json").stdout)
    return {a["asset_key"]: a for a in listed["assets"]}


def test_dg_scaffolds_checks_and_lists_the_component(project):
    folder, _ = project
    declared = (folder / "yaml_pipeline/defs/pipeline/defs.yaml").read_text()
    shutil.rmtree(folder / "yaml_pipeline/defs/pipeline")
    assert COMPONENT in _dg(project, "list", "components").stdout
    _dg(project, "scaffold", "defs", COMPONENT, "pipeline")
    scaffolded = (folder / "yaml_pipeline/defs/pipeline/defs.yaml").read_text()
    assert f"type: {COMPONENT}" in scaffolded
    _dg(project, "check", "defs")
    assert set(_assets(project)) == BUILT_IN  # no steps yet: the code location as shipped

    (folder / "yaml_pipeline/defs/pipeline/defs.yaml").write_text(declared)
    _dg(project, "check", "defs")
    assets = _assets(project)
    assert set(assets) == BUILT_IN | {"clipped_countries", "buffered_countries"}
    assert assets["buffered_countries"]["dependency_keys"] == ["clipped_countries"]
    assert assets["buffered_countries"]["description"] == "The clipped countries, grown by 10 km."

    broken = declared.replace("task: geoiso_dagster.ops:buffer", "taks: geoiso_dagster.ops:buffer")
    (folder / "yaml_pipeline/defs/pipeline/defs.yaml").write_text(broken)
    failed = _dg(project, "check", "defs", ok=False)
    assert "taks" in failed.stdout + failed.stderr


def test_the_yaml_pipeline_materializes_through_the_cli(project):
    folder, env = project
    root = Path(env["GEOISO_DATA_ROOT"])
    (root / "reference").mkdir(parents=True)
    box = shapely.box(-20, -36, 45, 60)
    mask = geopandas.GeoDataFrame({"mask": ["a"]}, geometry=[box], crs=4326).to_crs(6933)
    io.write_geoparquet(mask, root / "reference" / "mask.parquet")
    added = subprocess.run(
        [BIN / "geoiso", "add", str(SAMPLE)], env=env, capture_output=True, text=True
    )
    assert added.returncode == 0, added.stderr
    config = {"ops": {"reprojected_features": {"config": {"target_crs": "EPSG:6933"}}}}
    run = subprocess.run(
        [
            BIN / "dagster",
            "asset",
            "materialize",
            "-m",
            "yaml_pipeline.definitions",
            "--select",
            "raw_features,reprojected_features,clipped_countries,buffered_countries",
            "--partition",
            "countries.gpkg",
            "--config-json",
            json.dumps(config),
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    countries = geopandas.read_file(SAMPLE).to_crs(6933)
    expected = geopandas.clip(countries.set_geometry(countries.make_valid()), mask).buffer(10_000)
    buffered = geopandas.read_parquet(
        root / "warehouse" / "buffered_countries" / "countries.gpkg.parquet"
    )
    assert len(buffered) == len(expected) > 50
    assert buffered.area.sum() == pytest.approx(expected.area.sum(), rel=1e-9)


def test_dg_checks_and_lists_this_repository(project):
    """dg on geoiso-dagster itself ([tool.dg] in its pyproject.toml): the code location
    as shipped, its job, sensors and resource."""
    _, env = project
    repository = HERE.parents[1]
    checked = subprocess.run(
        [BIN / "dg", "check", "defs"], cwd=repository, env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    listed = subprocess.run(
        [BIN / "dg", "list", "defs", "--json"],
        cwd=repository,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    defs = json.loads(listed.stdout)
    assert {a["asset_key"] for a in defs["assets"]} == BUILT_IN
    assert {s["name"] for s in defs["sensors"]} >= {"inbox_sensor", "batch_remainder_sensor"}
