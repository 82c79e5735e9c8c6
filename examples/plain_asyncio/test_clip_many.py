"""The plain-asyncio example, run as a user runs it: a separate Python process that
never imports Dagster, two files clipped side by side in two workers."""

import re
import subprocess
import sys
from pathlib import Path

import geopandas
import pytest
import shapely

from geoiso_dagster.spatial import io

EXAMPLE = Path(__file__).with_name("clip_many.py")
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "countries.gpkg"


def test_the_pool_clips_files_side_by_side_from_asyncio_without_dagster(tmp_path):
    countries = geopandas.read_file(SAMPLE).to_crs(4326)
    halves = {"west": countries.cx[:0, :], "east": countries.cx[0:, :]}
    mask = geopandas.GeoDataFrame(geometry=[shapely.box(-30, -40, 60, 40)], crs=4326)
    io.write_geoparquet(mask, tmp_path / "mask.parquet")
    for name, frame in halves.items():
        io.write_geoparquet(frame, tmp_path / f"{name}.parquet")
    # The example, then a look at what it loaded: asyncio and the pool, never Dagster.
    probe = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__'); "
        "print('dagster loaded:', sorted(m for m in sys.modules if m.startswith('dagster')))"
    )
    files = [str(tmp_path / f"{name}.parquet") for name in halves]
    done = subprocess.run(
        [sys.executable, "-c", probe, str(EXAMPLE), str(tmp_path / "mask.parquet"), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dagster loaded: []" in done.stdout
    pids = set(re.findall(r"\(worker (\d+),", done.stdout))
    assert len(pids) == 2, done.stdout  # gathered: one worker each, side by side
    for name, frame in halves.items():
        clipped = geopandas.read_parquet(tmp_path / f"{name}.clipped.parquet")
        expected = geopandas.clip(frame.set_geometry(frame.make_valid()), mask)
        assert len(clipped) == len(expected) > 0
        area = clipped.to_crs(6933).area.sum()
        assert area == pytest.approx(expected.to_crs(6933).area.sum(), rel=1e-9)
