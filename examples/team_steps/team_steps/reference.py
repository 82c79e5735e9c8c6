"""Write this example's two reference layers into <data root>/reference/:

    python -m team_steps.reference [--crs EPSG:6933]

mask.parquet: one box over Europe and Africa; places.parquet: twelve capitals. Both in
the CRS the pipeline's reprojected_features has (its target_crs)."""

import argparse
import os
import sys
from pathlib import Path

import geopandas
import shapely

from geoiso_dagster.spatial.io import write_geoparquet

CAPITALS = {
    "Berlin": (13.40, 52.52),
    "Cairo": (31.24, 30.04),
    "Canberra": (149.13, -35.28),
    "Brasilia": (-47.88, -15.79),
    "Lima": (-77.04, -12.05),
    "Madrid": (-3.70, 40.42),
    "Nairobi": (36.82, -1.29),
    "New Delhi": (77.21, 28.61),
    "Ottawa": (-75.70, 45.42),
    "Paris": (2.35, 48.86),
    "Tokyo": (139.69, 35.69),
    "Warsaw": (21.01, 52.23),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crs", default="EPSG:6933")
    args = parser.parse_args(argv)
    folder = Path(os.environ.get("GEOISO_DATA_ROOT", "data")) / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    mask = geopandas.GeoDataFrame(
        {"mask": ["europe_africa"]}, geometry=[shapely.box(-20, -36, 45, 60)], crs=4326
    )
    places = geopandas.GeoDataFrame(
        {"name": list(CAPITALS)},
        geometry=shapely.points(list(CAPITALS.values())),
        crs=4326,
    )
    for name, frame in (("mask", mask), ("places", places)):
        write_geoparquet(frame.to_crs(args.crs), folder / f"{name}.parquet")
        sys.stdout.write(f"{folder / name}.parquet\n")


if __name__ == "__main__":
    main()
