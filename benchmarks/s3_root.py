"""One million polygons with the data root in a bucket, against the same on local disk.

    .venv/bin/python -m benchmarks.s3_root [--polygons 1000000] [--repeats 2] [--format fgb]

The 1M Voronoi coverage of benchmarks/scale.py (GeoParquet, cached in benchmarks/.data)
goes through a real `dagster asset materialize` of the three assets (EPSG:3035 ->
EPSG:4326, dissolve by region_id) on a fresh instance, alternately:
  local   GEOISO_DATA_ROOT a folder (the file hard-linked into its inbox)
  s3      GEOISO_DATA_ROOT=s3://geo/bench on a local S3 API server (moto, 127.0.0.1)
          started for the run; the file uploaded into its inbox first (timed apart), the
          host's mirror empty at the start of each run
With --format fgb the source is that coverage as FlatGeobuf (made once, cached too), so
that on the bucket raw_features reads it through GDAL's /vsis3/ rather than Arrow.
Prints the medians of --repeats runs of each, the ratio s3 / local, and where the extra
time goes, from the steps' own log lines ("S3 transfers: ...", "published ... in"):
fetching what a step reads, uploading the staged object, reading it back for the
checks, and publishing it.

With --fetch, also the s3 run with GEOISO_S3_SOURCES=fetch: the source fetched whole into
the host's mirror first, instead of read in place by range requests.

With --hosts, each of the three steps also runs as its own `dagster asset materialize`
with a mirror of its own (as on three hosts, or three run containers on different
machines), so reprojected_features and dissolved_regions read their upstream object in
place, by range requests; against the same three commands on local disk.
Results also go to benchmarks/results/s3-<time>.json.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.results import recorded
from benchmarks.scale import BIN, REPO, TARGET_CRS, materialize, run_facts, source
from geoiso_dagster.defs.assets import ASSET_NAMES
from tests.harness.s3 import S3Server

CONFIG = {
    "reprojected_features": {"config": {"target_crs": TARGET_CRS}},
    "dissolved_regions": {"config": {"dissolve_by": "region_id"}},
}
_TRANSFERS = re.compile(
    r"(\w+): S3 transfers: input \(([^)]*)\) in ([\d.]+) s, work ([\d.]+) s, "
    r"upload ([\d.]+) MB in ([\d.]+) s, read back and checked in ([\d.]+) s"
)
_PUBLISHED = re.compile(r"(\w+): published to the bucket in ([\d.]+) s")


def _instance(work: Path, name: str) -> Path:
    home = work / f"home-{name}"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "local" / "dagster.yaml", home / "dagster.yaml")
    return home


def run_local(given: Path, work: Path, n: int) -> dict:
    home, root = _instance(work, f"local-{n}"), work / f"data-{n}"
    (root / "inbox").mkdir(parents=True)
    os.link(given, root / "inbox" / given.name)
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEOISO_DATA_ROOT": str(root)}
    subprocess.run([BIN / "geoiso", "add", str(root / "inbox" / given.name)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    seconds = materialize(given.name, list(ASSET_NAMES), CONFIG, env)
    return {"seconds": seconds, "steps": run_facts(home)}


def run_s3(given: Path, work: Path, n: str, server: S3Server, sources: str = "in-place") -> dict:
    home = _instance(work, f"s3-{sources}-{n}")
    prefix = f"bench-{sources}-{n}"
    scratch = work / f"scratch-{sources}-{n}"
    env = {
        **os.environ,
        **server.env(f"s3://geo/{prefix}"),
        "DAGSTER_HOME": str(home),
        "GEOISO_SCRATCH_DIR": str(scratch),
        "GEOISO_S3_SOURCES": sources,
    }
    started = time.perf_counter()
    subprocess.run([BIN / "geoiso", "add", str(given)], env=env, check=True, capture_output=True)
    add_s = time.perf_counter() - started
    seconds = materialize(given.name, list(ASSET_NAMES), CONFIG, env)
    transfers = _transfers(home)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"seconds": seconds, "add_s": add_s, "steps": run_facts(home), "transfers": transfers}


def run_split(given: Path, work: Path, n: str, server: S3Server | None) -> dict:
    """The three steps as three commands; with `server`, each with a fresh mirror."""
    home = _instance(work, f"split-{'s3' if server else 'local'}-{n}")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    if server is None:
        root = work / f"data-split-{n}"
        (root / "inbox").mkdir(parents=True)
        os.link(given, root / "inbox" / given.name)
        env["GEOISO_DATA_ROOT"] = str(root)
    else:
        env.update(server.env(f"s3://geo/split-{n}"))
    env["GEOISO_SCRATCH_DIR"] = str(work / f"scratch-split-{n}-0")
    subprocess.run([BIN / "geoiso", "add", str(given)], env=env, check=True, capture_output=True)
    seconds, transfers = 0.0, {}
    for i, asset in enumerate(ASSET_NAMES):
        env["GEOISO_SCRATCH_DIR"] = str(work / f"scratch-split-{n}-{i + 1}")  # another host
        config = {asset: CONFIG[asset]} if asset in CONFIG else {}
        seconds += materialize(given.name, [asset], config, env)
        if server is not None:
            transfers.update(_transfers(home))
    return {"seconds": seconds, "transfers": transfers}


def _transfers(home: Path) -> dict:
    """Per asset: the seconds and MB its step's log reports for each S3 transfer."""
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = str(home)
    found: dict[str, dict] = {}
    with DagsterInstance.get() as instance:
        (record,) = instance.get_run_records(limit=1)
        for entry in instance.all_logs(record.dagster_run.run_id):
            if match := _TRANSFERS.search(entry.user_message or ""):
                asset, how, fetch_s, work_s, up_mb, up_s, back_s = match.groups()
                found.setdefault(asset, {}).update(
                    input=how, fetch_s=float(fetch_s), work_s=float(work_s),
                    upload_mb=float(up_mb), upload_s=float(up_s), readback_s=float(back_s),
                )  # fmt: skip
            elif match := _PUBLISHED.search(entry.user_message or ""):
                found.setdefault(match.group(1), {})["publish_s"] = float(match.group(2))
    return found


def flatgeobuf(given: Path) -> Path:
    """The GeoParquet source as FlatGeobuf (with its spatial index), made once."""
    import geopandas
    import pyogrio

    path = given.with_suffix(".fgb")
    if not path.exists():
        partial = path.with_name(".partial-" + path.name)
        pyogrio.write_dataframe(geopandas.read_parquet(given), partial, driver="FlatGeobuf")
        partial.rename(path)
    return path


def _where(kind: str, runs: dict) -> None:
    """Where the last `kind` run's time went, per step, from the steps' own log lines."""
    print(f"\nwhere the {kind} run's time goes, per step (its last run):")
    last = runs[kind][-1]
    print(f"  {'step':<22}{'step s':>8}{'local s':>9}  {'input':<26}{'upload':>15}"
          f"{'read back':>11}{'publish':>9}")  # fmt: skip
    for asset in ASSET_NAMES:
        t = last["transfers"].get(asset, {})
        print(
            f"  {asset:<22}{last['steps'][asset]['seconds']:8.1f}"
            f"{runs['local'][-1]['steps'][asset]['seconds']:9.1f}"
            f"  {t.get('input', '?')[:18]:<18}{t.get('fetch_s', 0):6.1f} s"
            f"{t.get('upload_s', 0):6.1f} s{t.get('upload_mb', 0):6.0f} MB"
            f"{t.get('readback_s', 0):9.1f} s{t.get('publish_s', 0):7.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--polygons", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hosts", action="store_true", help="also each step on its own host")
    parser.add_argument("--format", choices=("parquet", "fgb"), default="parquet")
    parser.add_argument("--fetch", action="store_true", help="also sources fetched whole")
    args = parser.parse_args()
    given = source(args.polygons)
    if args.format == "fgb":
        given = flatgeobuf(given)
    print(f"source: {given.name}, {given.stat().st_size / 2**20:.0f} MB", flush=True)
    runs: dict[str, list] = {
        "local": [],
        "s3": [],
        "s3 fetch": [],
        "local split": [],
        "s3 hosts": [],
    }
    kinds = ["local", "s3"] + (["s3 fetch"] if args.fetch else [])
    kinds += ["local split", "s3 hosts"] if args.hosts else []
    with tempfile.TemporaryDirectory(prefix="geoiso-s3-bench-") as tmp:
        work = Path(tmp)
        server = S3Server(work / "moto.log")
        try:
            server.client().create_bucket(Bucket="geo")
            for i in range(args.repeats):
                for kind in kinds:
                    n = f"{args.polygons}-{i}"
                    print(f"run {i + 1}/{args.repeats}: {kind} ...", flush=True)
                    if kind == "local":
                        runs[kind].append(run_local(given, work, n))
                    elif kind == "s3":
                        runs[kind].append(run_s3(given, work, n, server))
                    elif kind == "s3 fetch":
                        runs[kind].append(run_s3(given, work, n, server, "fetch"))
                    else:
                        split_server = server if kind == "s3 hosts" else None
                        runs[kind].append(run_split(given, work, n, split_server))
                    print(f"  {runs[kind][-1]['seconds']:.1f} s", flush=True)
        finally:
            server.stop()
    local = statistics.median(r["seconds"] for r in runs["local"])
    s3 = statistics.median(r["seconds"] for r in runs["s3"])
    print(f"\n{args.polygons:,} polygons, median of {args.repeats} runs each (same run):")
    print(f"  local disk  {local:6.1f} s   1.00x")
    print(f"  s3 in place {s3:6.1f} s   {s3 / local:.2f}x   (+{s3 - local:.1f} s)")
    if args.fetch:
        fetched = statistics.median(r["seconds"] for r in runs["s3 fetch"])
        print(
            f"  s3, fetched {fetched:6.1f} s   {fetched / local:.2f}x   (+{fetched - local:.1f} s)"
        )
    print(f"  geoiso add uploading the source: {runs['s3'][0]['add_s']:.1f} s (not included)")
    for kind in ("s3", "s3 fetch") if args.fetch else ("s3",):
        _where(kind, runs)
    if args.hosts:
        split = statistics.median(r["seconds"] for r in runs["local split"])
        hosts = statistics.median(r["seconds"] for r in runs["s3 hosts"])
        print("\neach step its own command (three CLI starts), each s3 step on a fresh host:")
        print(f"  local disk        {split:6.1f} s   1.00x")
        print(
            f"  s3, three hosts   {hosts:6.1f} s   {hosts / split:.2f}x   (+{hosts - split:.1f} s)"
        )
        for asset, t in runs["s3 hosts"][-1]["transfers"].items():
            print(f"  {asset:<22} input ({t.get('input')}) {t.get('fetch_s', 0):.1f} s, "
                  f"work {t.get('work_s', 0):.1f} s, upload {t.get('upload_s', 0):.1f} s, "
                  f"read back {t.get('readback_s', 0):.1f} s")  # fmt: skip
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    out = results / f"s3-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"polygons": args.polygons, "runs": runs}, indent=2, default=str))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    with recorded("s3_root"):
        main()
