"""The real command line: `geoiso add`, then `dagster asset materialize` in a subprocess
on a temporary DAGSTER_HOME and data root, then the instance's event log read back."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance

from geoiso_dagster.defs.assets import ASSET_NAMES, geo_assets
from geoiso_dagster.defs.steps import spec_of
from geoiso_dagster.paths import output_path
from tests.harness.live import materialize_command

BIN = Path(sys.executable).parent
SELECT = ",".join(ASSET_NAMES)
# What each built-in asset's blocking check judges, as its spec says.
CRITERIA_BY_ASSET = {spec_of(a).name: spec_of(a).criteria for a in geo_assets}
CONFIG = {
    "ops": {
        "reprojected_features": {"config": {"target_crs": "EPSG:6933"}},
        "dissolved_regions": {"config": {"dissolve_by": "continent"}},
    }
}


@pytest.fixture
def cli_env(tmp_path, data_root):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy("deploy/local/dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEOISO_DATA_ROOT": str(data_root)}
    return env


def _geoiso(env, *args):
    return subprocess.run(
        [BIN / "geoiso", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_add_then_materialize_with_the_dagster_cli(cli_env, data_root, tmp_path):
    source = tmp_path / "countries.gpkg"
    shutil.copy("data/sample/countries.gpkg", source)
    added = _geoiso(cli_env, "add", str(source))
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip().splitlines()[-1]
    assert key == "countries.gpkg"
    assert (data_root / "inbox" / key).read_bytes() == source.read_bytes()

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    run = subprocess.run(
        materialize_command(key, CONFIG),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    after = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert after == [], "the CLI run left processes behind"

    shown = _geoiso(cli_env, "show", key)
    assert shown.returncode == 0, shown.stderr
    assert "dissolved_regions     rows=8      crs=EPSG:6933" in shown.stdout

    os.environ["DAGSTER_HOME"] = cli_env["DAGSTER_HOME"]
    try:
        with DagsterInstance.get() as instance:
            for name in ASSET_NAMES:
                event = instance.get_latest_materialization_event(AssetKey(name))
                md = event.asset_materialization.metadata
                assert event.asset_materialization.partition == key
                assert md["path"].value == str(output_path(name, key, data_root))
                assert md["dagster/row_count"].value == (8 if name == "dissolved_regions" else 177)
                assert md["crs"].value in ("EPSG:4326", "EPSG:6933")
            (run,) = instance.get_runs()
            records = instance.get_records_for_run(
                run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
            ).records
            evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
            # One check per asset, a verdict per criterion in its metadata.
            assert sorted(e.asset_key.to_user_string() for e in evaluations) == sorted(ASSET_NAMES)
            assert all(e.passed and e.check_name == "integrity" for e in evaluations)
            for e in evaluations:
                criteria = CRITERIA_BY_ASSET[e.asset_key.to_user_string()]
                assert e.metadata["failed"].value == "none"
                assert all(e.metadata[c].value["passed"] is True for c in criteria)
            assert sum(len(c) for c in CRITERIA_BY_ASSET.values()) == 14
    finally:
        os.environ.pop("DAGSTER_HOME")


def test_add_refuses_an_unsafe_name_and_needs_dagster_home(cli_env, tmp_path):
    bad = tmp_path / "a,b.gpkg"
    bad.write_bytes(b"x")
    result = _geoiso(cli_env, "add", str(bad))
    assert result.returncode == 2
    assert "not usable as a partition key" in result.stderr
    assert "Traceback" not in result.stderr

    no_home = {k: v for k, v in cli_env.items() if k != "DAGSTER_HOME"}
    result = _geoiso(no_home, "add", "data/sample/countries.gpkg")
    assert result.returncode == 2 and "DAGSTER_HOME is not set" in result.stderr


@pytest.mark.parametrize(
    ("part", "make", "cause"),
    [
        (".prj", lambda p, outside: p.mkdir(), "its parcel.prj is a directory"),
        (".cpg", lambda p, outside: os.mkfifo(p), "its parcel.cpg is not a regular file (FIFO"),
        (".cpg", lambda p, outside: p.symlink_to(p.with_suffix(".gone")), "is a dangling link"),
        (
            ".shp.xml",
            lambda p, outside: p.symlink_to(outside),
            "its parcel.shp.xml is a link out of the delivery's folder",
        ),
    ],
    ids=["directory", "fifo", "dangling", "link-out"],
)
def test_add_refuses_a_part_that_is_no_file_of_the_delivery(
    cli_env, data_root, tmp_path, naturalearth_shp, part, make, cause
):
    """A companion that is a directory or FIFO (the copy would fail or block), a dangling
    link, or a link out of the delivery (it was followed, and the outside file copied in):
    refused in one line naming the source; nothing reaches the inbox."""
    delivery = tmp_path / "delivery"
    delivery.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("not the delivery's")
    for each in naturalearth_shp.parent.glob("naturalearth_lowres.*"):
        if each.suffix not in (".cpg", part):
            shutil.copy(each, delivery / f"parcel{each.suffix}")
    make(delivery / f"parcel{part}", outside)
    result = subprocess.run(
        [BIN / "geoiso", "add", str(delivery / "parcel.shp")],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert cause in result.stderr and str(delivery / "parcel.shp") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (data_root / "inbox").exists() or not list((data_root / "inbox").iterdir())


def test_add_brings_a_shapefile_with_its_parts(cli_env, data_root, naturalearth_shp):
    result = _geoiso(cli_env, "add", str(naturalearth_shp))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "naturalearth_lowres.shp"
    names = sorted(p.name for p in (data_root / "inbox").iterdir())
    assert names == sorted(p.name for p in naturalearth_shp.parent.glob("naturalearth_lowres.*"))


def _in_own_mounts(script: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a user and mount namespace of its own: it may mount a
    read-only view or a tiny file system over a folder, seen by it alone, without root."""
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("storage", ["read-only", "full"])
def test_add_into_an_inbox_that_refuses_says_so_in_one_line(cli_env, data_root, tmp_path, storage):
    """`geoiso add` into a read-only inbox, or a full one: one `geoiso:` line naming the
    inbox folder and the OS error (it was a raw PermissionError / OSError traceback), and
    nothing partial left in the inbox."""
    inbox = data_root / "inbox"
    big = tmp_path / "big.gpkg"
    shutil.copy("data/sample/countries.gpkg", big)
    with open(big, "ab") as grow:  # larger than the tiny file system below
        grow.write(b"\0" * 2_000_000)
    if storage == "read-only":
        mount = f"mount --bind {inbox} {inbox} && mount -o remount,bind,ro {inbox}"
        expected = "Read-only file system (EROFS)"
    else:
        mount = f"mount -t tmpfs -o size=256k tmpfs {inbox}"
        expected = "No space left on device (ENOSPC)"
    result = _in_own_mounts(
        f"{mount} && {BIN / 'geoiso'} add {big}; echo rc=$?; ls -A {inbox}", cli_env
    )
    assert "rc=2" in result.stdout, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("geoiso: "), result.stderr
    assert str(inbox) in errors[0] and expected in errors[0], errors
    assert "Traceback" not in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "rc=2", "something was left in the inbox"


def test_a_read_only_warehouse_is_a_storage_fault_not_bad_input(cli_env, data_root, tmp_path):
    """A worker writing its output into a read-only data root: the failure names the
    folder and the OS error as the storage's ("Bad input" of a temp file, before)."""
    (data_root / "warehouse").mkdir()
    source = data_root / "inbox" / "countries.gpkg"
    shutil.copy("data/sample/countries.gpkg", source)
    script = (
        "from geoiso_dagster.defs.resources import TASK_MODULE\n"
        "from geoiso_dagster.errors import StorageAccessError\n"
        "from geoiso_dagster.pool import PoolSettings, WorkerPool\n"
        "with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=1)) as pool:\n"
        "    try:\n"
        f"        pool.run('ingest', source={str(source)!r},"
        f" output={str(data_root / 'warehouse' / 'raw.parquet')!r})\n"
        "    except StorageAccessError as exc:\n"
        "        print('storage:', exc)\n"
    )
    (tmp_path / "ro.py").write_text(script)
    warehouse = data_root / "warehouse"
    result = _in_own_mounts(
        f"mount --bind {warehouse} {warehouse} && mount -o remount,bind,ro {warehouse} && "
        f"{sys.executable} {tmp_path / 'ro.py'}",
        {**cli_env, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [s for s in result.stdout.splitlines() if s.startswith("storage:")]
    assert str(warehouse) in line and "Read-only file system (EROFS)" in line, line
    assert "Bad input" not in line and "input is not at fault" in line


def test_concurrent_adds_on_a_fresh_instance_all_register(
    cli_env, data_root, tmp_path, monkeypatch
):
    """Five `geoiso add` at once on an instance no one has opened yet: each created its
    tables at once, and most failed with a raw SQLite traceback ("table ... already
    exists", "more than one head"). They now take turns opening the instance."""
    names = [f"parcel_{i}.gpkg" for i in range(5)]
    for name in names:
        shutil.copy("data/sample/countries.gpkg", tmp_path / name)
    adds = [
        subprocess.Popen(
            [BIN / "geoiso", "add", str(tmp_path / name)],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    outcomes = [(p.wait(timeout=180), *p.communicate()) for p in adds]
    assert [rc for rc, _, _ in outcomes] == [0] * 5, [err[-800:] for _, _, err in outcomes]
    assert sorted(out.strip() for _, out, _ in outcomes) == names
    from dagster import DagsterInstance

    from geoiso_dagster.defs.partitions import source_files

    monkeypatch.setenv("DAGSTER_HOME", cli_env["DAGSTER_HOME"])
    with DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions(source_files.name)) == names
