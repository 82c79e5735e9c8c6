"""Large-data machinery proven on small data: rows in Hilbert order (external sort in
bounded memory, parts merged), dissolves planned by what a worker may hold, and the
hierarchical union of a group too large for one worker. The 10M-polygon case itself is
benchmarks/scale.py."""

import geopandas
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyproj
import pytest
import shapely

from benchmarks.data import voronoi_coverage
from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.pool import PoolSettings, WorkerPool
from geoiso_dagster.spatial import hilbert, io, tasks, union
from geoiso_dagster.spatial.ingest import ingest_file
from geoiso_dagster.spatial.io import SOURCE_ROW


def test_the_hilbert_index_walks_every_cell_once_from_neighbour_to_neighbour():
    for order in (1, 2, 4, 6):
        cells = np.arange(2**order)
        x, y = (a.ravel() for a in np.meshgrid(cells, cells))
        d = hilbert.index(x, y, order=order)
        assert sorted(d.tolist()) == list(range(4**order))
        walk = np.argsort(d)
        steps = np.abs(np.diff(x[walk].astype(int))) + np.abs(np.diff(y[walk].astype(int)))
        assert set(steps.tolist()) == {1}
    # the full 32-bit grid: the corners of the curve and no overflow at the far end
    top = np.array([2**32 - 1], dtype=np.uint64)
    zero = np.array([0], dtype=np.uint64)
    assert hilbert.index(zero, zero)[0] == 0
    assert hilbert.index(top, zero)[0] == np.uint64(2**64 - 1)


def _cells(n: int, seed: int = 11) -> geopandas.GeoDataFrame:
    frame = voronoi_coverage(n, seed=seed)
    frame["row"] = np.arange(n)
    frame["everything"] = "all"  # one key for all: a single giant group
    return frame


def _row_groups_read(path, box) -> float:
    """The share of row groups a bbox filter must read, from the bbox covering column's
    Parquet statistics (what GDAL, DuckDB and pyarrow filters use)."""
    metadata = pq.ParquetFile(path).metadata
    names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    at = {f: names.index(f"bbox.{f}") for f in ("xmin", "ymin", "xmax", "ymax")}
    hits = 0
    for g in range(metadata.num_row_groups):
        stats = {f: metadata.row_group(g).column(i).statistics for f, i in at.items()}
        hits += (
            stats["xmin"].min <= box[2]
            and stats["xmax"].max >= box[0]
            and stats["ymin"].min <= box[3]
            and stats["ymax"].max >= box[1]
        )
    return hits / metadata.num_row_groups


def test_rows_are_written_in_hilbert_order_and_a_bbox_read_skips_most_row_groups(
    data_root, monkeypatch
):
    """Streamed in batches, spilled as sorted runs (a run of 64 KB here), merged: the
    output holds exactly the input's rows, in Hilbert order, and a query of 1% of the
    extent reads a few of its row groups where the input's order reads nearly all."""
    frame = _cells(20_000)
    source = data_root / "cells.parquet"
    frame.to_parquet(source, row_group_size=500, write_covering_bbox=True)
    monkeypatch.setattr(hilbert, "RUN_BYTES", 64 * 2**10)
    out = data_root / "raw.parquet"
    assert ingest_file(source, out, group_rows=500)["rows"] == 20_000
    metadata = pq.ParquetFile(out).metadata  # groups end at quadtree cells: 350 to 500 rows
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert max(sizes) <= 500 and min(sizes[:-1]) >= 350 and sum(sizes) == 20_000
    written = geopandas.read_parquet(out)
    # the same rows, bit for bit, only in another order
    back = written.sort_values(SOURCE_ROW, ignore_index=True)
    assert (back.pop(SOURCE_ROW) == frame["row"]).all()  # each row knows where it came from
    assert shapely.equals_exact(back.geometry.values, frame.geometry.values, tolerance=0).all()
    pd.testing.assert_frame_equal(
        pd.DataFrame(back.drop(columns="geometry")), pd.DataFrame(frame.drop(columns="geometry"))
    )
    domain = io.coordinate_limits(pyproj.CRS("EPSG:3035"))
    keys = hilbert.keys(pq.read_table(out, columns=["bbox"]).column(0), domain)
    assert (np.diff(keys.astype(np.float64)) >= 0).all()
    # the same file sorted in one run, in memory
    monkeypatch.setattr(hilbert, "RUN_BYTES", 2**30)
    assert ingest_file(source, data_root / "one_run.parquet", group_rows=500)["rows"] == 20_000
    assert pq.read_table(out).equals(pq.read_table(data_root / "one_run.parquet"))

    minx, miny, maxx, maxy = frame.total_bounds
    w, h = (maxx - minx) / 10, (maxy - miny) / 10
    boxes = [
        (minx + i * w, miny + j * h, minx + (i + 1) * w, miny + (j + 1) * h)
        for i, j in [(0, 0), (3, 7), (5, 5), (9, 2), (6, 9)]
    ]
    sorted_share = max(_row_groups_read(out, box) for box in boxes)
    unsorted_share = min(_row_groups_read(source, box) for box in boxes)
    assert sorted_share <= 0.15 < 0.9 <= unsorted_share


def _dissolve(runner, source, output, **options):
    return fanout.dissolve(runner, str(source), output, **options)


AGGREGATIONS = {
    "name": "first",
    "population": "sum",
    "pop_mean": "mean",
    "pop_median": "median",
    "pop_min": "min",
    "pop_max": "max",
    "pop_count": "count",
    "pop_nunique": "nunique",
    "pop_std": "std",
    "pop_var": "var",
    "last_name": "last",
}


def test_a_group_too_large_for_a_worker_is_unioned_in_parts_and_equals_the_plain_union(
    data_root, monkeypatch
):
    """Planned for workers of 4 MB (a share of 0.4 MB), one group of 20,000 polygons is
    a giant: unioned in a chunk per row group (about 50 of at most 500 rows, each
    ending at a quadtree cell's boundary), then 16 partial unions at a time, then once more.
    Geometry, feature count and every aggregation equal the one-task dissolve; the
    ordinary groups are planned into key ranges whose join equals it too."""
    monkeypatch.setattr(fanout, "FAN_OUT_MIN_ROWS", 1)
    frame = _cells(20_000)
    population = frame["population"].astype(float)
    population[::7] = np.nan  # nulls: skipped by every aggregation as pandas skips them
    for column in (
        "pop_mean",
        "pop_median",
        "pop_min",
        "pop_max",
        "pop_count",
        "pop_nunique",
        "pop_std",
        "pop_var",
    ):
        frame[column] = population
    frame["last_name"] = frame["name"]
    frame.loc[frame.index[-3:], "last_name"] = None
    given = data_root / "cells.parquet"
    frame.to_parquet(given, row_group_size=500, write_covering_bbox=True)
    source = data_root / "raw.parquet"  # as raw_features is: in Hilbert order
    ingest_file(given, source, group_rows=500)
    groups = pq.ParquetFile(source).num_row_groups
    assert 40 <= groups <= 20_000 / (0.7 * 500)
    options = {"aggfunc": "first", "aggregations": AGGREGATIONS}

    plain = tasks.dissolve(str(source), str(data_root / "plain.parquet"), "everything", **options)
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=2)) as pool:
        runner = TaskRunner(pool)
        runner.memory_limit_mb = 4  # the plan's view of a worker; the pool's is its own
        plan = runner.run(
            "plan_dissolve",
            source=str(source),
            dissolve_by="everything",
            memory_limit_mb=4,
            min_parts=2,
        ).facts
        assert plan["parts"] == [] and len(plan["giants"]) == 1
        assert len(plan["giants"][0]["chunks"]) == groups and plan["giants"][0]["rows"] == 20_000
        staged = data_root / "hier.parquet"
        result = _dissolve(runner, source, staged, dissolve_by="everything", **options)
        by_region = _dissolve(
            runner, source, data_root / "regions.parquet", dissolve_by="region_id", **options
        )
    assert result.facts["fanned_out_over"] == groups + 1  # the chunks, then the last union
    assert result.facts["union_tasks"] == -(-groups // 16) + 1  # 16 at a time, then once
    assert result.facts["giant_groups"] == 1
    a, b = geopandas.read_parquet(plain["path"]), geopandas.read_parquet(staged)
    assert len(b) == 1 and shapely.is_valid(b.geometry.values).all()
    assert b.geometry.area[0] == pytest.approx(frame.geometry.area.sum(), rel=1e-9)
    assert b.geometry.area[0] == pytest.approx(a.geometry.area[0], rel=1e-9)
    assert shapely.equals(a.geometry[0], b.geometry[0])
    columns = [c for c in a.columns if c != "geometry"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(a[columns]), pd.DataFrame(b[columns]), check_dtype=False, rtol=1e-9
    )
    assert b.loc[0, "pop_median"] == population.median()
    assert b.loc[0, "last_name"] == frame["name"].iloc[-4]  # "last": in the source's order
    # Sorting changes no result: the source in its own order, dissolved in one task.
    original = tasks.dissolve(str(given), str(data_root / "o.parquet"), "everything", **options)
    o = geopandas.read_parquet(original["path"])
    pd.testing.assert_frame_equal(
        pd.DataFrame(o[columns]), pd.DataFrame(b[columns]), check_dtype=False, rtol=1e-9
    )
    assert o.geometry.area[0] == pytest.approx(b.geometry.area[0], rel=1e-9)

    whole = tasks.dissolve(str(source), str(data_root / "w.parquet"), "region_id", **options)
    assert by_region.facts["fanned_out_over"] >= 2
    assert pq.read_table(data_root / "regions.parquet").equals(pq.read_table(whole["path"]))
    # ... and to the source dissolved in its own order: same groups, attributes, areas
    unsorted = tasks.dissolve(str(given), str(data_root / "u.parquet"), "region_id", **options)
    u = geopandas.read_parquet(unsorted["path"]).sort_values("region_id", ignore_index=True)
    r = geopandas.read_parquet(whole["path"]).sort_values("region_id", ignore_index=True)
    columns = [c for c in u.columns if c != "geometry"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(u[columns]), pd.DataFrame(r[columns]), check_dtype=False, rtol=1e-9
    )
    assert np.allclose(u.geometry.area, r.geometry.area, rtol=1e-9, atol=0)


def test_a_group_that_does_not_fit_even_in_parts_fails_naming_it(data_root, monkeypatch):
    """Squares that touch nothing: unioning them shrinks nothing, so the partial unions
    of the one group are as large as the input, more than the plan's worker may hold."""
    monkeypatch.setattr(fanout, "FAN_OUT_MIN_ROWS", 1)
    n = 6000
    x = np.arange(n) % 100 * 10.0
    y = np.arange(n) // 100 * 10.0
    frame = geopandas.GeoDataFrame(
        {"kind": ["parcel"] * n}, geometry=shapely.box(x, y, x + 1, y + 1), crs=3035
    )
    source = data_root / "squares.parquet"
    frame.to_parquet(source, row_group_size=200, write_covering_bbox=True)
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=2)) as pool:
        runner = TaskRunner(pool)
        runner.memory_limit_mb = 1
        with pytest.raises(BadInputError) as caught:
            _dissolve(runner, source, data_root / "out.parquet", dissolve_by="kind")
    message = str(caught.value)
    assert "group 'parcel'" in message and "(6000 features)" in message
    assert "memory_limit_mb=1" in message and "squares.parquet" in message
    assert not (data_root / "out.parquet").exists()
    assert [p.name for p in data_root.iterdir() if p.name.startswith(".")] == []


def test_parts_are_sized_by_the_ceiling_not_by_the_worker_count(data_root):
    """The plan cuts the keys so that no part holds more than a tenth of a worker's
    ceiling: a smaller ceiling, more parts; never fewer parts than workers."""
    frame = _cells(20_000)
    source = data_root / "cells.parquet"
    frame.to_parquet(source, row_group_size=500, write_covering_bbox=True)
    data = sum(pq.ParquetFile(source).metadata.row_group(i).total_byte_size for i in range(40))
    counts = {}
    for limit in (1, 4, 64):
        plan = union.plan(str(source), "region_id", limit, min_parts=2)
        ranges = plan["parts"]
        assert ranges[0][0] == 0 and ranges[-1][1] == plan["groups"]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        sizes = frame.groupby("region_id").size().to_numpy() * data / len(frame)
        held = [sizes[lo:hi].sum() for lo, hi in ranges]
        assert max(held) <= max(union.budget_bytes(limit), sizes.max())
        counts[limit] = len(ranges)
    assert counts[1] > counts[4] > counts[64] == 2
