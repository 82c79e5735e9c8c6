"""geoiso_dagster.ops in a real worker pool: each function's result, over the whole
source and over parts of it (runs of row groups, as a fan-out runs them), equals
geopandas' own call on the whole frames."""

import geopandas
import numpy as np
import pandas as pd
import pytest
import shapely

from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.pool import PoolSettings, WorkerPool
from geoiso_dagster.spatial import io
from tests.harness.grids import grid

ROWS_PER_GROUP = 40  # countries: 177 rows in 5 row groups


@pytest.fixture(scope="module")
def layers(naturalearth_shp, tmp_path_factory):
    """Countries in an equal-area CRS (5 row groups), a mask of two boxes, 12 zones of a
    grid, and the countries' representative points (all written as outputs are here)."""
    folder = tmp_path_factory.mktemp("layers")
    countries = geopandas.read_file(naturalearth_shp).to_crs(6933)
    invalid = countries[~countries.is_valid]
    countries["geometry"] = countries.make_valid()  # see the bad input test for why
    countries["country_id"] = np.arange(len(countries))
    zones = grid((-17e6, -7e6, 17e6, 7e6), 4, 3, crs=6933)
    mask = geopandas.GeoDataFrame(
        {"mask": ["a", "b"]},
        geometry=[shapely.box(-2e6, -4e6, 4e6, 4e6), shapely.box(6e6, 0, 12e6, 5e6)],
        crs=6933,
    )
    points = countries[["country_id"]].copy()
    points = geopandas.GeoDataFrame(points, geometry=countries.representative_point(), crs=6933)
    paths = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(io, "ROW_GROUP_ROWS", ROWS_PER_GROUP)
        for name, frame in (("countries", countries), ("zones", zones), ("mask", mask)):
            paths[name] = str(folder / f"{name}.parquet")
            io.write_geoparquet(frame, paths[name])
        paths["points"] = str(folder / "points.parquet")
        io.write_geoparquet(points, paths["points"])
    frames = {name: geopandas.read_parquet(path) for name, path in paths.items()}
    assert all("bbox" not in frame.columns for frame in frames.values())  # read as covering
    paths["invalid"] = str(folder / "invalid.parquet")
    io.write_geoparquet(invalid, paths["invalid"])
    frames["invalid"] = invalid
    return paths, frames, folder


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=2)) as pool:
        yield pool


def _run(pool, folder, function, source, parts, **kwargs) -> geopandas.GeoDataFrame:
    """`function` over the whole source (parts None) or over each run of row groups, the
    parts' outputs concatenated."""
    outputs = []
    for n, groups in enumerate(parts or [None]):
        output = str(folder / f"{function.rpartition(':')[2]}-{n}.parquet")
        extra = {"row_groups": groups} if groups is not None else {}
        facts = pool.run(function, source=source, output=output, **kwargs, **extra).facts
        frame = geopandas.read_parquet(output)
        assert facts["rows"] == len(frame)
        outputs.append(frame)
    return pd.concat(outputs, ignore_index=True)


def _same(got: geopandas.GeoDataFrame, expected: geopandas.GeoDataFrame, by: list[str]) -> None:
    """Equal rows (sorted by `by`), attributes, and geometries (the symmetric difference
    of each pair is nothing: unions of other subsets may order vertices otherwise)."""
    assert len(got) == len(expected) > 0
    got = got.sort_values(by).reset_index(drop=True)
    expected = expected.sort_values(by).reset_index(drop=True)[got.columns]
    attributes = [c for c in got.columns if c != got.geometry.name]
    pd.testing.assert_frame_equal(
        pd.DataFrame(got[attributes]), pd.DataFrame(expected[attributes]), check_dtype=False
    )
    difference = shapely.symmetric_difference(got.geometry.values, expected.geometry.values)
    scale = np.maximum(expected.geometry.area.to_numpy(), 1.0)
    assert (shapely.area(difference) / scale).max() < 1e-9


# Runs of the countries' 5 row groups: whole, and the two parts a fan-out over 2 runs.
PARTS = [None, [[0, 1, 2], [3, 4]]]


@pytest.mark.parametrize("parts", PARTS)
def test_clip_equals_geopandas_clip(pool, layers, parts):
    paths, frames, folder = layers
    got = _run(
        pool, folder, "geoiso_dagster.ops:clip", paths["countries"], parts, mask=paths["mask"]
    )
    _same(got, geopandas.clip(frames["countries"], frames["mask"]), ["country_id"])


@pytest.mark.parametrize("parts", PARTS)
def test_overlay_equals_geopandas_overlay(pool, layers, parts):
    paths, frames, folder = layers
    got = _run(
        pool, folder, "geoiso_dagster.ops:overlay", paths["countries"], parts, other=paths["zones"]
    )
    expected = geopandas.overlay(frames["countries"], frames["zones"], how="intersection")
    assert {"zone", "country_id", "name"} <= set(got.columns)  # the attributes of both
    _same(got, expected, ["country_id", "zone"])


# (right layer, its key column, predicate, more arguments)
SJOINS = [
    ("zones", "zone", "intersects", {}),
    ("zones", "zone", "within", {}),
    ("mask", "mask", "nearest", {"distance": 1.5e6}),
]


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize(("layer", "key", "predicate", "extra"), SJOINS)
def test_sjoin_equals_geopandas_sjoin(pool, layers, parts, layer, key, predicate, extra):
    paths, frames, folder = layers
    got = _run(
        pool,
        folder,
        "geoiso_dagster.ops:sjoin",
        paths["points"],
        parts,
        right=paths[layer],
        predicate=predicate,
        **extra,
    )
    points, right = frames["points"], frames[layer]
    if predicate == "nearest":
        expected = geopandas.sjoin_nearest(
            points, right, max_distance=extra["distance"], distance_col="distance"
        )
        assert 0 < len(expected) < len(points)  # the distance matters here
    else:
        expected = geopandas.sjoin(points, right, predicate=predicate)
    _same(got, expected.drop(columns=["index_right"]), ["country_id", key])


def test_buffer_and_simplify_equal_geopandas(pool, layers):
    paths, frames, folder = layers
    countries = frames["countries"]
    got = _run(
        pool, folder, "geoiso_dagster.ops:buffer", paths["countries"], PARTS[1], distance=5e4
    )
    expected = countries.set_geometry(countries.buffer(5e4))
    _same(got, expected, ["country_id"])
    got = _run(pool, folder, "geoiso_dagster.ops:simplify", paths["countries"], None, tolerance=2e4)
    _same(got, countries.set_geometry(countries.simplify(2e4)), ["country_id"])


def test_the_other_layer_is_read_only_where_the_part_reaches(pool, layers):
    """A part reads of the right layer only what its bbox reaches (row groups lying
    apart skipped): fewer zones than there are, and each one it needs."""
    paths, frames, folder = layers
    facts = pool.run(
        "geoiso_dagster.ops:sjoin",
        source=paths["points"],
        output=str(folder / "part.parquet"),
        right=paths["zones"],
        row_groups=[0],
    ).facts
    points = frames["points"].iloc[:ROWS_PER_GROUP]
    needed = geopandas.sjoin(points, frames["zones"])["zone"].nunique()
    assert needed <= facts["right_features_read"] < len(frames["zones"])


def test_bad_settings_and_layers_are_bad_input_naming_them(pool, layers, tmp_path):
    from geoiso_dagster.errors import BadInputError

    paths, frames, folder = layers
    output = str(tmp_path / "out.parquet")
    other_crs = str(tmp_path / "mask4326.parquet")
    io.write_geoparquet(frames["mask"].to_crs(4326), other_crs)
    cases = [
        (
            dict(function="geoiso_dagster.ops:clip", mask=other_crs),
            "is in EPSG:4326 and the source in EPSG:6933",
        ),
        (
            dict(function="geoiso_dagster.ops:clip", mask=str(tmp_path / "none.parquet")),
            "does not exist",
        ),
        (
            dict(function="geoiso_dagster.ops:overlay", other=paths["zones"], how="union"),
            "overlay here supports",
        ),
        (
            dict(function="geoiso_dagster.ops:sjoin", right=paths["zones"], predicate="touches"),
            "one of intersects",
        ),
    ]
    for kwargs, cause in cases:
        with pytest.raises(BadInputError, match=cause):
            pool.run(source=paths["countries"], output=output, **kwargs)
    assert not (tmp_path / "out.parquet").exists()
    # Natural Earth's Antarctica (and a few others) become invalid in EPSG:6933: GEOS
    # refuses to cut them, and that is the file's fault, said with the remedy...
    with pytest.raises(BadInputError, match="GEOS cannot work with .* make them valid first") as e:
        pool.run(
            "geoiso_dagster.ops:clip",
            source=paths["invalid"],
            output=output,
            mask=paths["mask"],
            repair=False,
        )
    assert e.value.path.startswith(paths["invalid"])
    # ...unless they are repaired first, as they are by default, and counted.
    facts = pool.run(
        "geoiso_dagster.ops:clip", source=paths["invalid"], output=output, mask=paths["mask"]
    ).facts
    assert facts["repaired_geometries"] == len(frames["invalid"]) > 0


def test_a_part_with_nothing_in_it_does_not_blank_the_joined_metadata(pool, layers, tmp_path):
    """A fan-out part whose rows the mask misses writes an empty file; the joined file
    still declares the other parts' geometry types and bbox."""
    paths, frames, folder = layers
    parts = []
    for n, groups in enumerate([[0], [1, 2, 3, 4]]):
        parts.append(str(tmp_path / f"part{n}.parquet"))
        far = str(tmp_path / "far.parquet")
        if not n:  # the first part clipped to a mask far from everything: empty
            box = shapely.box(-1e5, 9e6, 0, 9.1e6)
            io.write_geoparquet(geopandas.GeoDataFrame(geometry=[box], crs=6933), far)
        mask = far if not n else paths["mask"]
        kwargs = {"source": paths["countries"], "output": parts[-1], "mask": mask}
        pool.run("geoiso_dagster.ops:clip", row_groups=groups, **kwargs)
    assert geopandas.read_parquet(parts[0]).empty
    joined = pool.run("join_parts", parts=parts, output=str(tmp_path / "joined.parquet")).facts
    assert joined["rows"] == len(geopandas.read_parquet(parts[1])) > 0
    assert set(joined["geometry_types"]) == {"MultiPolygon", "Polygon"}
    assert len(joined["bbox"]) == 4
