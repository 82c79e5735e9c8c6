import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from geoiso_dagster import fsutil
from geoiso_dagster.defs.retries import MAX_ATTEMPTS, MAX_WAIT_S, MIN_WAIT_S, backoff_seconds
from geoiso_dagster.errors import StorageAccessError, UnsafeNameError
from geoiso_dagster.fsutil import TEMP_MARKER, atomic_path, sweep_stale_temps, temp_path_for
from geoiso_dagster.paths import check_partition_key, output_path, source_path


@pytest.mark.parametrize(
    "key",
    [
        "",
        " ",
        "../etc/passwd",
        "a/b.gpkg",
        "a\\b.gpkg",
        "..",
        ".hidden.gpkg",
        "x\x00y",
        "tab\there",
        "a,b.gpkg",
        "x" * 201,
        "a...b",
        " lead.gpkg",
        "countries.gpkg.parquet.tmp-1@host-ab.gpkg",  # shaped like countries.gpkg's temps
        "x.TMP-1.gpkg",
    ],
)
def test_unsafe_partition_keys_are_refused(key, data_root):
    with pytest.raises(UnsafeNameError, match="not usable as a partition key"):
        check_partition_key(key)
    with pytest.raises(UnsafeNameError):
        output_path("raw_features", key)


@pytest.mark.parametrize("key", ["countries.gpkg", "Zürich parcels 2024.shp", "a-b_c.parquet"])
def test_ordinary_names_map_inside_the_data_root(key, data_root):
    assert source_path(key) == data_root / "inbox" / key
    assert output_path("dissolved_regions", key) == (
        data_root / "warehouse" / "dissolved_regions" / f"{key}.parquet"
    )


def test_data_root_defaults_to_dot_data(monkeypatch, tmp_path):
    monkeypatch.delenv("GEOISO_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert source_path("a.gpkg") == tmp_path / "data" / "inbox" / "a.gpkg"


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def _dead_pid() -> int:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(dead.stdout)


def test_sweep_removes_only_temps_of_dead_writers(tmp_path):
    target = tmp_path / "out.parquet"
    dead_pid = _dead_pid()
    orphan = tmp_path / f".out.parquet.tmp-{dead_pid}-abcd"
    orphan_of_live = tmp_path / f"..out.parquet.tmp-{os.getpid()}-ab.tmp-{dead_pid}-cd"
    live = temp_path_for(target)
    unrelated = tmp_path / ".other.parquet.tmp-1-ab"
    for p in (orphan, orphan_of_live, live, unrelated):
        p.write_bytes(b"x")
    removed = sweep_stale_temps(target)
    assert sorted(removed) == sorted([orphan, orphan_of_live])
    assert live.exists() and unrelated.exists()


def test_a_key_shaped_like_another_keys_temp_cannot_be_swept_for_it(tmp_path, data_root):
    """The sweep of key K's output takes every '.K.parquet.tmp-...' for a temp of K; a key
    whose own temps would start so ("K.parquet.tmp-<pid>@<host>-<token>...") would have
    its live temps removed by K's sweep: such keys are refused, and the sweep of a
    refused-shape name shows why (its writer chain reads as a dead writer's)."""
    shaped = f"countries.gpkg.parquet.tmp-{_dead_pid()}@{fsutil.host_tag()}-ab.gpkg"
    with pytest.raises(UnsafeNameError, match="the mark of this project's temp names"):
        check_partition_key(shaped)
    target = tmp_path / "countries.gpkg.parquet"
    other_keys_live_temp = temp_path_for(tmp_path / f"{shaped}.parquet")
    other_keys_live_temp.write_bytes(b"x")
    assert sweep_stale_temps(target) == [other_keys_live_temp]  # what the refusal prevents


def test_sweep_judges_other_hosts_by_lease_never_by_pid(tmp_path, monkeypatch):
    """A shared data root: a pid from another host means nothing here. Its temps stay
    while they are fresh, whatever pids exist here, and go once the lease ran out."""
    monkeypatch.setenv(fsutil.LEASE_ENV, "600")
    target = tmp_path / "out.parquet"
    here = fsutil.host_tag()
    other = "runabc123.f00d42"
    assert other != here and temp_path_for(target).name.count(f"@{here}-") == 1
    dead_pid = _dead_pid()
    fresh_other = tmp_path / f".out.parquet.tmp-{dead_pid}@{other}-aaaa"  # dead here, alive there
    stale_other = tmp_path / f".out.parquet.tmp-{os.getpid()}@{other}-bbbb"  # alive here
    other_dir = tmp_path / f".out.parquet.tmp-{dead_pid}@{other}-cccc"  # an unpacked archive
    dead_here = tmp_path / f".out.parquet.tmp-{dead_pid}@{here}-dddd"
    for p in (fresh_other, stale_other, dead_here):
        p.write_bytes(b"x")
    other_dir.mkdir()
    (other_dir / "inner.shp").write_bytes(b"x")
    old = time.time() - 601
    os.utime(stale_other, (old, old))
    os.utime(other_dir, (old, old))  # the folder is old but a file in it was just written
    removed = sweep_stale_temps(target)
    assert sorted(removed) == sorted([stale_other, dead_here])
    assert fresh_other.exists() and other_dir.exists()
    os.utime(other_dir / "inner.shp", (old, old))
    os.utime(fresh_other, (old, old))
    assert sorted(sweep_stale_temps(target)) == sorted([fresh_other, other_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_temp_names_stay_under_255_bytes_through_three_writers(tmp_path):
    target = tmp_path / ("k" * 200 + ".parquet")
    name = temp_path_for(temp_path_for(temp_path_for(target))).name
    assert len(name.encode()) <= 255 and name.count(TEMP_MARKER) == 3


def test_backoff_stays_within_5_and_60_seconds_and_grows():
    rng = random.Random(7)
    for retry in range(MAX_ATTEMPTS + 5):
        waits = [backoff_seconds(retry, rng) for _ in range(200)]
        assert all(MIN_WAIT_S <= w <= MAX_WAIT_S for w in waits)
    first = [backoff_seconds(0, rng) for _ in range(200)]
    second = [backoff_seconds(1, rng) for _ in range(200)]
    assert sum(second) / 200 > 1.5 * sum(first) / 200
    assert len({round(w, 6) for w in second}) > 100  # jittered, not a constant


def test_a_folder_removed_before_its_file_is_published_is_a_storage_fault(tmp_path):
    """The warehouse folder deleted mid-run: publishing names the folder and the OS error
    as the storage's fault (it read "Internal error ... FileNotFoundError")."""
    folder = tmp_path / "warehouse" / "raw_features"
    fsutil.make_dirs(folder)
    staged = folder / ".k.parquet.tmp-1"
    staged.write_bytes(b"x")
    shutil.rmtree(folder)
    with pytest.raises(StorageAccessError) as caught:
        fsutil.publish(staged, folder / "k.parquet")
    message = str(caught.value)
    assert str(folder) in message and "ENOENT" in message
    assert "the folder was removed while the run wrote into it" in message


def test_new_folders_are_made_durable_one_by_one(tmp_path):
    """make_dirs makes each missing folder and fsyncs the folder holding it (strace shows
    one fsync per new level: the entries of warehouse/ and warehouse/<asset>/)."""
    script = (
        "import sys; from pathlib import Path; from geoiso_dagster import fsutil; "
        "fsutil.make_dirs(Path(sys.argv[1]))"
    )
    target = tmp_path / "root" / "warehouse" / "raw_features"
    (tmp_path / "root").mkdir()
    traced = subprocess.run(
        ["strace", "-f", "-e", "trace=fsync,mkdir,mkdirat", sys.executable, "-c", script]
        + [str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert traced.returncode == 0, traced.stderr[-2000:]
    calls = [line for line in traced.stderr.splitlines() if "fsync(" in line or "mkdir" in line]
    made = [line for line in calls if str(tmp_path) in line and "mkdir" in line]
    assert len(made) == 2 and target.is_dir(), calls
    assert sum("fsync(" in line for line in calls) >= 2, calls
