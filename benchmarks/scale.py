"""Ten million polygons under a 1 GB worker ceiling, against one million in the same run.

    .venv/bin/python -m benchmarks.scale [--sizes 1000000 10000000] [--memory-limit-mb 1024]

For each size, a Voronoi coverage as GeoParquet (1M: benchmarks/data.py's; 10M: that one
tiled 5 x 2 over the same extent, each copy scaled into its tile and every other one
mirrored so that seams share their vertices, region ids kept apart per copy; both
written in the generator's order, row groups of 50,000, with a bbox covering; cached in
benchmarks/.data) goes through a real `dagster asset materialize` of
the three assets (EPSG:3035 -> EPSG:4326, dissolve by region_id) on a fresh instance,
with GEOISO_POOL_MEMORY_LIMIT_MB set, so that no step can pass by using more. Then
`dissolved_regions` again with one key for every row (`country`): the single giant
group, unioned in parts. Reported:

- the command's time, each step's time and its workers' peak RSS (the catalog's
  metadata), the 10M / 1M ratios (targets: time <= 11x, peak <= 1.25x);
- the longest silence in each step's run log (target: a line at least every 10 s);
- the share of row groups a bbox filter reads for 20 random queries of 1% of the extent
  (10% x 10%), from the bbox covering's Parquet statistics: the outputs (Hilbert order)
  against the source (the generator's order, which is what raw_features kept before);
- dissolved areas against the sum of the input areas per group (1e-9 relative; input =
  the reprojected output, read row group by row group), and validity.
Results also go to benchmarks/results/scale-<time>.json (git-ignored).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from benchmarks.data import CACHE, EXTENT, voronoi_coverage
from benchmarks.results import recorded
from geoiso_dagster.defs.assets import ASSET_NAMES
from tests.harness.live import materialize_command

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
TARGET_CRS = "EPSG:4326"
ROW_GROUP_ROWS = 50_000
TILES = (5, 2)  # copies across, up


def source(n: int) -> Path:
    """The n-polygon coverage as GeoParquet: 1M generated, 10M (and other multiples) its
    tiling. Made once."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"scale_{n}.parquet"
    if path.exists():
        return path
    base = voronoi_coverage(min(n, 1_000_000))
    base["country"] = "EU"
    copies = n // len(base)
    if copies == 1:
        _write([base], path)
        return path
    across, up = TILES
    if copies != across * up:
        raise SystemExit(f"--sizes: {n} is neither 1M nor {across * up} x 1M")
    minx, miny, maxx, maxy = EXTENT
    width, height = (maxx - minx) / across, (maxy - miny) / up
    frames = []
    size, parts = np.array([maxx - minx, maxy - miny]), np.array([across, up])
    for copy in range(copies):
        col, row = copy % across, copy // across
        shift = np.array([minx + col * width, miny + row * height])
        flip = np.array([col % 2, row % 2], dtype=bool)

        def move(xy, shift=shift, flip=flip):
            # Every other copy mirrored: a seam then joins the same vertices on both
            # sides (no T-junction, which reprojection would open into slivers), so the
            # tiling is still an exact coverage.
            local = xy - [minx, miny]
            return np.where(flip, size - local, local) / parts + shift

        frame = base.copy()
        frame["geometry"] = shapely.transform(base.geometry.values, move)
        frame["region_id"] = base["region_id"] + copy * 10_000
        frame["name"] = f"{copy}-" + base["name"]
        frames.append(frame)
    _write(frames, path)
    return path


def _write(frames, path: Path) -> None:
    """GeoParquet 1.1 with a bbox covering and row groups of 50,000, frame after frame."""
    tmp = path.with_suffix(".tmp")
    writer = None
    for frame in frames:
        for start in range(0, len(frame), ROW_GROUP_ROWS):
            table = _arrow(frame.iloc[start : start + ROW_GROUP_ROWS])
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    writer.close()
    tmp.rename(path)


def _arrow(frame) -> pa.Table:
    table = pa.Table.from_pandas(frame.drop(columns="geometry"), preserve_index=False)
    table = table.append_column(
        "geometry", pa.array(shapely.to_wkb(frame.geometry.values), type=pa.binary())
    )
    bounds = shapely.bounds(frame.geometry.values)
    box = pa.StructArray.from_arrays(
        [pa.array(bounds[:, i]) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"]
    )
    table = table.append_column("bbox", box)
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "crs": frame.crs.to_json_dict(),
                "geometry_types": ["MultiPolygon", "Polygon"],
                "covering": {"bbox": {f: ["bbox", f] for f in ("xmin", "ymin", "xmax", "ymax")}},
            }
        },
    }
    return table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})


def materialize(key: str, select: list[str], config: dict, env: dict) -> float:
    """A real `dagster asset materialize`; returns the seconds from its start to its exit."""
    command = materialize_command(key, {"ops": config}, select)
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-4000:])
    return seconds


def run_facts(home: Path) -> dict:
    """Per step of the instance's last run: seconds from start to success, the workers'
    peak RSS and the catalog's facts (its materialization metadata), and the longest
    silence between two lines of the step's log."""
    from dagster import DagsterEventType, DagsterInstance

    os.environ["DAGSTER_HOME"] = str(home)
    with DagsterInstance.get() as instance:
        (record,) = instance.get_run_records(limit=1)
        steps: dict[str, dict] = {}
        for entry in instance.all_logs(record.dagster_run.run_id):
            step = entry.step_key
            if step is None:
                continue
            facts = steps.setdefault(step, {"times": []})
            facts["times"].append(entry.timestamp)
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type == DagsterEventType.STEP_START:
                facts["start"] = entry.timestamp
            elif event.event_type == DagsterEventType.STEP_SUCCESS:
                facts["end"] = entry.timestamp
            elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                metadata = event.step_materialization_data.materialization.metadata
                facts["metadata"] = {
                    k: metadata[k].value
                    for k in (
                        "worker_peak_rss_mb",
                        "fanned_out_over",
                        "dagster/row_count",
                        "giant_groups",
                        "union_tasks",
                    )
                    if k in metadata
                }
    out = {}
    for step, facts in steps.items():
        times = sorted(t for t in facts["times"] if facts["start"] <= t <= facts["end"])
        out[step] = {
            "seconds": facts["end"] - facts["start"],
            "longest_silence_s": max(np.diff(times)) if len(times) > 1 else 0.0,
            **facts.get("metadata", {}),
        }
    return out


def bbox_read_share(path: Path, queries: int = 20, seed: int = 0) -> dict:
    """The share of row groups a bbox filter reads, by the bbox covering's statistics,
    for random queries of 10% x 10% of the file's extent."""
    metadata = pq.ParquetFile(path).metadata
    names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    at = [names.index(f"bbox.{f}") for f in ("xmin", "ymin", "xmax", "ymax")]
    boxes = np.array(
        [
            [
                metadata.row_group(g).column(at[0]).statistics.min,
                metadata.row_group(g).column(at[1]).statistics.min,
                metadata.row_group(g).column(at[2]).statistics.max,
                metadata.row_group(g).column(at[3]).statistics.max,
            ]
            for g in range(metadata.num_row_groups)
        ]
    )
    x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
    x1, y1 = boxes[:, 2].max(), boxes[:, 3].max()
    w, h = (x1 - x0) / 10, (y1 - y0) / 10
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(queries):
        qx, qy = rng.uniform(x0, x1 - w), rng.uniform(y0, y1 - h)
        hit = (boxes[:, 0] <= qx + w) & (boxes[:, 2] >= qx) & (boxes[:, 1] <= qy + h)
        shares.append(float((hit & (boxes[:, 3] >= qy)).mean()))
    return {
        "row_groups": metadata.num_row_groups,
        "mean_share": float(np.mean(shares)),
        "max_share": float(np.max(shares)),
    }


def areas_check(reprojected: Path, dissolved: Path, by: str) -> dict:
    """Each dissolved group's area against the sum of its input polygons' areas (the
    reprojected output, row group by row group), and validity."""
    parquet = pq.ParquetFile(reprojected)
    sums: dict = {}
    for g in range(parquet.num_row_groups):
        table = parquet.read_row_group(g, columns=[by, "geometry"])
        areas = shapely.area(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)))
        keys = table[by].to_numpy(zero_copy_only=False)
        uniques, inverse = np.unique(keys, return_inverse=True)
        for key, total in zip(uniques.tolist(), np.bincount(inverse, weights=areas), strict=True):
            sums[key] = sums.get(key, 0.0) + total
    out = pq.read_table(dissolved, columns=[by, "geometry"])
    shapes = shapely.from_wkb(out["geometry"].to_numpy(zero_copy_only=False))
    got = dict(zip(out[by].to_pylist(), shapely.area(shapes).tolist(), strict=True))
    worst = max(abs(got[k] - sums[k]) / sums[k] for k in sums) if set(got) == set(sums) else 1.0
    return {
        "groups": len(got),
        "same_groups": set(got) == set(sums),
        "worst_rel_area_diff": worst,
        "all_valid": bool(shapely.is_valid(shapes).all()),
    }


def measure(n: int, memory_limit_mb: int, work: Path) -> dict:
    given = source(n)
    home, root = work / f"home-{n}", work / f"data-{n}"
    (root / "inbox").mkdir(parents=True)
    home.mkdir()
    shutil.copy(REPO / "deploy" / "local" / "dagster.yaml", home / "dagster.yaml")
    dropped = root / "inbox" / given.name
    os.link(given, dropped)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GEOISO_DATA_ROOT": str(root),
        "GEOISO_POOL_MEMORY_LIMIT_MB": str(memory_limit_mb),
    }
    key = subprocess.run(
        [BIN / "geoiso", "add", str(dropped)], env=env, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    config = {
        "reprojected_features": {"config": {"target_crs": TARGET_CRS}},
        "dissolved_regions": {"config": {"dissolve_by": "region_id"}},
    }
    print(f"{n:,}: materializing the three assets ...", flush=True)
    seconds = materialize(key, list(ASSET_NAMES), config, env)
    steps = run_facts(home)
    warehouse = root / "warehouse"
    out = {name: warehouse / name / f"{key}.parquet" for name in ASSET_NAMES}
    result = {
        "polygons": n,
        "source_mb": given.stat().st_size / 2**20,
        "materialize_s": seconds,
        "steps": steps,
        "peak_rss_mb": max(s["worker_peak_rss_mb"] for s in steps.values()),
        "bbox_read": {
            "source (generator's order)": bbox_read_share(given),
            "raw_features": bbox_read_share(out["raw_features"]),
            "reprojected_features": bbox_read_share(out["reprojected_features"]),
        },
    }
    print(f"{n:,}: checking areas ...", flush=True)
    result["areas"] = areas_check(
        out["reprojected_features"], out["dissolved_regions"], "region_id"
    )
    print(f"{n:,}: one giant group (dissolve_by country) ...", flush=True)
    giant = {"dissolved_regions": {"config": {"dissolve_by": "country"}}}
    result["giant_s"] = materialize(key, ["dissolved_regions"], giant, env)
    result["giant"] = run_facts(home)["dissolved_regions"]
    result["giant_areas"] = areas_check(
        out["reprojected_features"], out["dissolved_regions"], "country"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--memory-limit-mb", type=int, default=1024)
    args = parser.parse_args()
    report = {"memory_limit_mb": args.memory_limit_mb, "sizes": {}}
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks") as tmp:
        for n in args.sizes:
            report["sizes"][n] = measure(n, args.memory_limit_mb, Path(tmp))
            _print(report["sizes"][n])
    base = report["sizes"][args.sizes[0]]
    for n in args.sizes[1:]:
        entry = report["sizes"][n]
        ratios = {
            "time": entry["materialize_s"] / base["materialize_s"],
            "peak_rss": entry["peak_rss_mb"] / base["peak_rss_mb"],
            "giant_time": entry["giant_s"] / base["giant_s"],
            "giant_peak_rss": entry["giant"]["worker_peak_rss_mb"]
            / base["giant"]["worker_peak_rss_mb"],
        }
        entry["ratios_to_first"] = ratios
        size_ratio = n / args.sizes[0]
        print(
            f"\n{n:,} against {args.sizes[0]:,} ({size_ratio:.0f}x the polygons): time "
            f"{ratios['time']:.2f}x (target <= {1.1 * size_ratio:.0f}x), worker peak RSS "
            f"{ratios['peak_rss']:.2f}x (target <= 1.25x); one giant group: time "
            f"{ratios['giant_time']:.2f}x, peak {ratios['giant_peak_rss']:.2f}x"
        )
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(report, indent=2, default=str)
    )


def _print(entry: dict) -> None:
    print(
        f"\n{entry['polygons']:,} polygons ({entry['source_mb']:.0f} MB of GeoParquet): "
        f"`dagster asset materialize` {entry['materialize_s']:.1f} s, worker peak RSS "
        f"{entry['peak_rss_mb']:.0f} MB"
    )
    print(f"{'step':<22}{'s':>8}{'peak MB':>9}{'parts':>7}{'longest silence s':>19}")
    for step, facts in entry["steps"].items():
        print(
            f"{step:<22}{facts['seconds']:>8.1f}{facts['worker_peak_rss_mb']:>9.0f}"
            f"{facts.get('fanned_out_over', 1):>7}{facts['longest_silence_s']:>19.1f}"
        )
    g = entry["giant"]
    print(
        f"one giant group: {entry['giant_s']:.1f} s (step {g['seconds']:.1f} s), peak "
        f"{g['worker_peak_rss_mb']:.0f} MB, {g.get('fanned_out_over')} chunks, "
        f"{g.get('union_tasks')} union tasks; area {entry['giant_areas']}"
    )
    print(f"areas by region: {entry['areas']}")
    for name, share in entry["bbox_read"].items():
        print(
            f"1% bbox query reads {100 * share['mean_share']:.1f} % of {share['row_groups']} "
            f"row groups on average, {100 * share['max_share']:.1f} % at most: {name}"
        )


if __name__ == "__main__":
    with recorded("scale"):
        main()
