"""Zones for the join tests: a grid of named boxes over an extent."""

import geopandas
import numpy as np
import shapely


def grid(
    extent: tuple[float, float, float, float], columns: int, rows: int, crs
) -> geopandas.GeoDataFrame:
    """columns x rows boxes tiling `extent`, named "z<column><row>"."""
    minx, miny, maxx, maxy = extent
    xs, ys = np.linspace(minx, maxx, columns + 1), np.linspace(miny, maxy, rows + 1)
    cells = [(i, j) for i in range(columns) for j in range(rows)]
    return geopandas.GeoDataFrame(
        {"zone": [f"z{i}{j}" for i, j in cells]},
        geometry=[shapely.box(xs[i], ys[j], xs[i + 1], ys[j + 1]) for i, j in cells],
        crs=crs,
    )
