"""The plain recipe and the plain loop over files, in a module that imports only
geopandas, run as its own interpreter by benchmarks/small_files.py:

    .venv/bin/python -m benchmarks.recipe --out DIR FILE...

so that a fresh worker (whose start method preloads the main module) loads what a user's
script would, not this project or Dagster."""

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import geopandas


def plain_recipe(source: str, output: str, target_crs: str, by: str) -> None:
    """read_file; to_crs; buffer(0) twice; dissolve(by, aggfunc="first"); GeoJSON."""
    frame = geopandas.read_file(source)
    frame = frame.to_crs(target_crs)
    frame["geometry"] = frame.buffer(0).buffer(0)
    frame.dissolve(by=by, aggfunc="first").to_file(output, driver="GeoJSON")


def _fresh_pool_call(start_method: str, source: str, output: str) -> None:
    """The seed's wrapper: a fresh process pool per call."""
    context = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(plain_recipe, source, output, "EPSG:4326", "region_id").result()


def main() -> None:
    """The plain loop over files, two at a time, in this interpreter; prints seconds."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--start-method", default="forkserver")
    parser.add_argument("--out", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as threads:
        list(
            threads.map(
                lambda s: _fresh_pool_call(
                    args.start_method, s, str(out / f"{Path(s).stem}.geojson")
                ),
                args.files,
            )
        )
    print(time.perf_counter() - started)


if __name__ == "__main__":
    main()
