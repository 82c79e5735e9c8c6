import os
import random
import subprocess
import sys

import pytest

from geoiso_dagster.defs.retries import MAX_ATTEMPTS, MAX_WAIT_S, MIN_WAIT_S, backoff_seconds
from geoiso_dagster.errors import UnsafeNameError
from geoiso_dagster.fsutil import atomic_path, sweep_stale_temps, temp_path_for
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


def test_sweep_removes_only_temps_of_dead_writers(tmp_path):
    target = tmp_path / "out.parquet"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".out.parquet.tmp-{dead_pid}-abcd"
    orphan_of_live = tmp_path / f"..out.parquet.tmp-{os.getpid()}-ab.tmp-{dead_pid}-cd"
    live = temp_path_for(target)
    unrelated = tmp_path / ".other.parquet.tmp-1-ab"
    for p in (orphan, orphan_of_live, live, unrelated):
        p.write_bytes(b"x")
    removed = sweep_stale_temps(target)
    assert sorted(removed) == sorted([orphan, orphan_of_live])
    assert live.exists() and unrelated.exists()


def test_backoff_stays_within_5_and_60_seconds_and_grows():
    rng = random.Random(7)
    for retry in range(MAX_ATTEMPTS + 5):
        waits = [backoff_seconds(retry, rng) for _ in range(200)]
        assert all(MIN_WAIT_S <= w <= MAX_WAIT_S for w in waits)
    first = [backoff_seconds(0, rng) for _ in range(200)]
    second = [backoff_seconds(1, rng) for _ in range(200)]
    assert sum(second) / 200 > 1.5 * sum(first) / 200
    assert len({round(w, 6) for w in second}) > 100  # jittered, not a constant
