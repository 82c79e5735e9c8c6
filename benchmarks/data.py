"""Benchmark data, made in code: a Voronoi coverage of N polygons in a projected CRS
(ETRS89-LAEA Europe, EPSG:3035) with a spatially coherent region_id, written as the
GeoPackage users would drop (and as GeoParquet for the GeoParquet baselines).

Cached in benchmarks/.data/ (git-ignored); the seed makes every run the same data.
"""

from pathlib import Path

import geopandas
import numpy as np
import shapely

CACHE = Path(__file__).parent / ".data"
CRS = "EPSG:3035"
EXTENT = (3_500_000.0, 2_000_000.0, 5_500_000.0, 4_000_000.0)  # 2000 km x 2000 km


def voronoi_coverage(n: int, seed: int = 42) -> geopandas.GeoDataFrame:
    """n polygons that tile the extent exactly (a valid coverage); region_id groups them
    in square blocks so that about sqrt(n) / 2 regions of contiguous cells result."""
    rng = np.random.default_rng(seed)
    minx, miny, maxx, maxy = EXTENT
    xy = np.column_stack([rng.uniform(minx, maxx, n), rng.uniform(miny, maxy, n)])
    cells = shapely.voronoi_polygons(
        shapely.multipoints(xy), extend_to=shapely.box(*EXTENT), ordered=True
    )
    polygons = shapely.intersection(shapely.get_parts(cells), shapely.box(*EXTENT))
    blocks = max(2, int(np.sqrt(np.sqrt(n))))  # blocks per side
    col = np.minimum(((xy[:, 0] - minx) / (maxx - minx) * blocks).astype(int), blocks - 1)
    row = np.minimum(((xy[:, 1] - miny) / (maxy - miny) * blocks).astype(int), blocks - 1)
    return geopandas.GeoDataFrame(
        {
            "region_id": (row * blocks + col).astype("int64"),
            "name": np.char.add("cell-", np.arange(n).astype(str)),
            "population": rng.integers(0, 10_000, n),
        },
        geometry=polygons,
        crs=CRS,
    )


def dataset(n: int) -> tuple[Path, Path]:
    """(GeoPackage, GeoParquet) of the n-polygon coverage, made once."""
    CACHE.mkdir(exist_ok=True)
    gpkg, parquet = CACHE / f"voronoi_{n}.gpkg", CACHE / f"voronoi_{n}.parquet"
    if not (gpkg.exists() and parquet.exists()):
        frame = voronoi_coverage(n)
        frame.to_parquet(parquet, compression="zstd")
        frame.to_file(gpkg, layer="cells", engine="pyogrio")
    return gpkg, parquet
