"""The worker functions on real data, called directly (they are plain functions)."""

import json
import os
import shutil
from pathlib import Path

import geopandas
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import Polygon

from geoiso_dagster.errors import BadInputError, TransientIOError
from geoiso_dagster.spatial import tasks
from geoiso_dagster.spatial.ingest import ingest_file
from geoiso_dagster.spatial.io import ROW_GROUP_ROWS, SLICE_ROWS, SOURCE_ROW


@pytest.fixture(autouse=True)
def _any_root(monkeypatch):
    """These tests call the worker functions in this process, on files in pytest's tmp and
    in pyogrio's fixtures; the jail (every source inside the data root) is tested on its
    own in tests/test_jail.py."""
    monkeypatch.setenv("GEOISO_DATA_ROOT", "/")


def _chain(source: Path, tmp_path: Path, crs: str, by: str) -> tuple[dict, dict, dict]:
    raw = tasks.ingest(str(source), str(tmp_path / "raw.parquet"))
    rep = tasks.reproject(raw["path"], str(tmp_path / "rep.parquet"), crs)
    dis = tasks.dissolve(rep["path"], str(tmp_path / "dis.parquet"), by)
    return raw, rep, dis


def test_countries_to_equal_area_then_dissolved_by_continent(naturalearth_shp, tmp_path):
    raw, rep, dis = _chain(naturalearth_shp, tmp_path, "EPSG:6933", "continent")
    assert raw["rows"] == rep["rows"] == 177
    assert rep["crs"] == "EPSG:6933" and rep["transformed"] is True
    out = geopandas.read_parquet(dis["path"])
    assert len(out) == dis["rows"] == 8
    assert out.crs.to_epsg() == 6933
    assert shapely.is_valid(out.geometry.values).all()
    assert out["feature_count"].sum() == 177

    # Sudan's ring self-intersects once reprojected: make_valid must have repaired it.
    reprojected = geopandas.read_parquet(rep["path"])
    sudan = reprojected.loc[reprojected["name"] == "Sudan", "geometry"].iloc[0]
    assert not sudan.is_valid
    assert dis["repaired_geometries"] >= 1

    # Independent computation, in shapely directly: repair, union per continent, area.
    expected = {}
    for continent, group in reprojected.groupby("continent"):
        parts = shapely.make_valid(group.geometry.values)
        polys = [
            p
            for g in parts
            for p in shapely.get_parts(shapely.get_parts(g))
            if p.geom_type == "Polygon"
        ]
        expected[continent] = shapely.union_all(polys).area
    got = dict(zip(out["continent"], out.geometry.area, strict=True))
    assert set(got) == set(expected)
    for continent, area in expected.items():
        assert got[continent] == pytest.approx(area, rel=1e-9), continent


def _overlapping_parts(tmp_path: Path) -> Path:
    """One MultiPolygon of two 2x2 squares overlapping on a 1x1 square, and one of a
    square with a hole plus a part filling that hole: unions of 7 and 16 by hand."""
    from shapely.geometry import MultiPolygon, box

    holed = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 2)]])
    frame = geopandas.GeoDataFrame(
        {"region_id": ["a", "b"]},
        geometry=[
            MultiPolygon([box(0, 0, 2, 2), box(1, 1, 3, 3)]),
            MultiPolygon([holed, box(1, 1, 2, 2)]),
        ],
        crs="EPSG:3857",
    )
    assert not frame.geometry.is_valid.any()
    frame.to_parquet(tmp_path / "multi.parquet")
    return tmp_path / "multi.parquet"


def test_a_multipolygon_of_overlapping_parts_dissolves_to_their_union(tmp_path):
    """make_valid's default (linework) keeps only what an odd number of parts cover: the
    overlap's area was lost, green. The union of the parts is the intent."""
    dis = tasks.dissolve(
        str(_overlapping_parts(tmp_path)), str(tmp_path / "d.parquet"), "region_id"
    )
    out = geopandas.read_parquet(dis["path"]).set_index("region_id")
    assert dis["repaired_geometries"] == 2
    assert out.geometry.area.to_dict() == {"a": pytest.approx(7.0), "b": pytest.approx(16.0)}


def test_a_repair_that_loses_area_is_refused(tmp_path, monkeypatch):
    """The area check after the repair can fail: with make_valid's linework method put
    back, the overlap is lost and the file is refused, naming the row and both areas."""
    linework = shapely.make_valid
    monkeypatch.setattr(shapely, "make_valid", lambda g, **kw: linework(g))
    with pytest.raises(BadInputError, match=r"row 0: .* gave area 6, not the 7 of its parts"):
        tasks.dissolve(str(_overlapping_parts(tmp_path)), str(tmp_path / "d.parquet"), "region_id")
    assert not (tmp_path / "d.parquet").exists()


def test_bowtie_keeps_both_lobes(tmp_path):
    """buffer(0) keeps one lobe of a self-intersecting bowtie; make_valid keeps both."""
    bowtie = Polygon([(0, 0), (2, 2), (2, 0), (0, 2), (0, 0)])
    assert not bowtie.is_valid and shapely.buffer(bowtie, 0).area == pytest.approx(1.0)
    frame = geopandas.GeoDataFrame(
        {"region_id": ["a", "a"]},
        geometry=[bowtie, Polygon([(5, 5), (6, 5), (6, 6)])],
        crs="EPSG:3857",
    )
    source = tmp_path / "bowtie.parquet"
    frame.to_parquet(source)
    _, _, dis = _chain(source, tmp_path, "EPSG:3857", "region_id")
    out = geopandas.read_parquet(dis["path"])
    assert len(out) == 1
    assert out.geometry.iloc[0].area == pytest.approx(2.0 + 0.5, rel=1e-12)


@pytest.mark.parametrize(
    ("driver", "suffix"),
    [
        ("ESRI Shapefile", ".shp"),
        ("GPKG", ".gpkg"),
        ("GeoJSON", ".geojson"),
        ("FlatGeobuf", ".fgb"),
        (None, ".parquet"),
    ],
)
def test_ingest_reads_every_common_format(driver, suffix, naturalearth_shp, tmp_path):
    frame = geopandas.read_file(naturalearth_shp)
    source = tmp_path / f"countries{suffix}"
    if driver is None:
        frame.to_parquet(source)
    else:
        frame.to_file(source, driver=driver)
    facts = tasks.ingest(str(source), str(tmp_path / "out.parquet"))
    out = geopandas.read_parquet(facts["path"])
    assert len(out) == facts["rows"] == 177
    assert out.crs.equals(frame.crs)
    assert sorted(out["continent"].unique()) == sorted(frame["continent"].unique())
    assert out.geometry.area.sum() == pytest.approx(frame.geometry.area.sum(), rel=1e-9)


def test_reproject_skips_when_crs_equal_by_meaning(naturalearth_shp, tmp_path):
    raw = tasks.ingest(str(naturalearth_shp), str(tmp_path / "raw.parquet"))
    # OGC:CRS84 and EPSG:4326 differ in axis order; a WKT of EPSG:4326 is the same CRS.
    import pyproj

    rep = tasks.reproject(raw["path"], str(tmp_path / "rep.parquet"), pyproj.CRS(4326).to_wkt())
    assert rep["transformed"] is False
    a = geopandas.read_parquet(raw["path"]).geometry
    b = geopandas.read_parquet(rep["path"]).geometry
    assert a.geom_equals_exact(b, tolerance=0).all()


def test_geoparquet_is_good_geoparquet(tmp_path):
    n = 2 * ROW_GROUP_ROWS + 10
    rng = np.random.default_rng(1)
    frame = geopandas.GeoDataFrame(
        {"region_id": rng.integers(0, 5, n)},
        geometry=geopandas.points_from_xy(rng.uniform(0, 1e5, n), rng.uniform(0, 1e5, n)),
        crs="EPSG:3035",
    )
    source = tmp_path / "points.parquet"
    frame.to_parquet(source)
    facts = tasks.ingest(str(source), str(tmp_path / "out.parquet"))
    meta = pq.ParquetFile(facts["path"])
    geo = json.loads(meta.schema_arrow.metadata[b"geo"])
    assert geo["version"] == "1.1.0"
    assert "bbox" in geo["columns"]["geometry"]["covering"]
    assert meta.metadata.num_row_groups == 3
    assert meta.metadata.row_group(0).column(0).compression == "ZSTD"
    assert facts["rows"] == n and facts["row_groups"] == 3


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        ("no_prj", "no coordinate reference system"),
        ("zero_bytes", "empty (0 bytes)"),
        ("truncated", "cannot be read"),
        ("no_features", "no features"),
        ("missing", "does not exist"),
    ],
)
def test_bad_inputs_name_the_file_and_cause(
    make, cause, naturalearth_shp, copy_shapefile, tmp_path
):
    if make == "no_prj":
        source = copy_shapefile(naturalearth_shp, tmp_path, skip=(".prj",))
    elif make == "zero_bytes":
        source = tmp_path / "empty.gpkg"
        source.touch()
    elif make == "truncated":
        source = tmp_path / "truncated.gpkg"
        source.write_bytes(Path("data/sample/countries.gpkg").read_bytes()[:3000])
    elif make == "no_features":
        source = tmp_path / "nothing.geojson"
        source.write_text('{"type": "FeatureCollection", "features": []}')
    else:
        source = tmp_path / "missing.gpkg"
    output = tmp_path / "out.parquet"
    output.write_bytes(b"previous good output")
    with pytest.raises(BadInputError) as info:
        tasks.ingest(str(source), str(output))
    assert info.value.path == str(source)
    assert cause in info.value.cause
    assert output.read_bytes() == b"previous good output"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_missing_dissolve_key_lists_the_columns(naturalearth_shp, tmp_path):
    raw = tasks.ingest(str(naturalearth_shp), str(tmp_path / "raw.parquet"))
    with pytest.raises(BadInputError) as info:
        tasks.dissolve(raw["path"], str(tmp_path / "dis.parquet"), "region_id")
    assert "'region_id' is not in the data" in info.value.cause
    assert "continent" in info.value.cause
    assert not (tmp_path / "dis.parquet").exists()


def test_bad_target_crs_is_bad_input(naturalearth_shp, tmp_path):
    raw = tasks.ingest(str(naturalearth_shp), str(tmp_path / "raw.parquet"))
    with pytest.raises(BadInputError, match="not a CRS PROJ knows"):
        tasks.reproject(raw["path"], str(tmp_path / "rep.parquet"), "EPSG:999999")


def test_lines_only_cannot_be_dissolved(tmp_path):
    frame = geopandas.GeoDataFrame(
        {"region_id": [1]}, geometry=[shapely.LineString([(0, 0), (1, 1)])], crs="EPSG:3857"
    )
    frame.to_parquet(tmp_path / "lines.parquet")
    with pytest.raises(BadInputError, match="no polygonal geometries"):
        tasks.dissolve(str(tmp_path / "lines.parquet"), str(tmp_path / "d.parquet"), "region_id")


def test_aggregations_and_null_keys(tmp_path):
    squares = [shapely.box(i, 0, i + 1, 1) for i in range(4)]
    frame = geopandas.GeoDataFrame(
        {"region_id": ["a", "a", "b", None], "pop": [1, 2, 3, 4]},
        geometry=squares,
        crs="EPSG:3857",
    )
    frame.to_parquet(tmp_path / "sq.parquet")
    facts = tasks.dissolve(
        str(tmp_path / "sq.parquet"),
        str(tmp_path / "d.parquet"),
        "region_id",
        aggregations={"pop": "sum"},
    )
    out = geopandas.read_parquet(facts["path"]).set_index("region_id")
    assert out.loc["a", "pop"] == 3 and out.loc["b", "pop"] == 3
    assert out.loc["a"].geometry.area == pytest.approx(2.0)
    assert facts["dropped_null_keys"] == 1


def decode_png(data: bytes) -> np.ndarray:
    """RGBA pixels of a PNG, read by Pillow (not by the encoder's author)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGBA"))


def test_thumbnail_draws_each_region_in_its_colour_and_leaves_holes_empty():
    from geoiso_dagster.spatial.thumbnail import PALETTE, render

    square_with_hole = Polygon(
        [(0, 0), (10, 0), (10, 10), (0, 10)], [[(4, 4), (6, 4), (6, 6), (4, 6)]]
    )
    png = render([square_with_hole, shapely.box(20, 0, 30, 10)], max_width=62, max_height=40)
    pixels = decode_png(png)
    height, width, _ = pixels.shape
    assert (width, height) == (62, 22)
    scale = 60 / 30

    def at(x, y):
        return pixels[int((10 - y) * scale + 1), int(x * scale + 1)]

    assert tuple(at(2, 2)[:3]) == tuple(PALETTE[0]) and at(2, 2)[3] == 255
    assert tuple(at(25, 5)[:3]) == tuple(PALETTE[1])
    assert at(5, 5)[3] == 0, "the hole stays transparent"
    assert at(15, 5)[3] == 0, "the gap between regions stays transparent"


def test_dissolve_reports_a_small_map(naturalearth_shp, tmp_path):
    import base64

    _, _, dis = _chain(naturalearth_shp, tmp_path, "EPSG:6933", "continent")
    png = base64.b64decode(dis["thumbnail_png"])
    assert len(png) < 10_000
    pixels = decode_png(png)
    assert pixels.shape[1] == 240 and (pixels[..., 3] == 255).mean() > 0.2


@pytest.mark.parametrize("target", ["EPSG:6933", "EPSG:3857", "ESRI:54009"])
def test_streamed_reprojection_is_bit_identical_to_the_whole_frame_one(target, tmp_path):
    """Row groups streamed through shapely.transform + pyproj give exactly what
    GeoDataFrame.to_crs gives, for 2D and 3D geometries, across row groups."""
    n = ROW_GROUP_ROWS + 123
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-170, 170, n), rng.uniform(-80, 80, n)
    polygons = shapely.buffer(shapely.points(x, y), 0.5, quad_segs=2)
    polygons[::7] = shapely.force_3d(polygons[::7], z=12.5)
    frame = geopandas.GeoDataFrame(
        {"region_id": np.arange(n) % 9, "fid": np.arange(n)}, geometry=polygons, crs=4326
    )
    raw = tasks.ingest(_parquet(frame, tmp_path / "in.parquet"), str(tmp_path / "raw.parquet"))
    assert raw["row_groups"] == 2
    streamed = tasks.reproject(raw["path"], str(tmp_path / "rep.parquet"), target)
    assert streamed["transformed"] and streamed["row_groups"] == 2 and streamed["rows"] == n
    # Each file is in Hilbert order in its own CRS: rows are matched by their id.
    out = geopandas.read_parquet(streamed["path"]).sort_values("fid", ignore_index=True)
    whole = geopandas.read_parquet(raw["path"]).to_crs(target).sort_values("fid", ignore_index=True)
    assert out.crs.equals(whole.crs)
    assert shapely.equals_exact(out.geometry.values, whole.geometry.values, tolerance=0).all()
    assert (shapely.has_z(out.geometry.values) == shapely.has_z(polygons)).all()
    assert streamed["bbox"] == pytest.approx(list(whole.total_bounds), rel=1e-12)
    geo = json.loads(pq.ParquetFile(streamed["path"]).schema_arrow.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and "bbox" in geo["columns"]["geometry"]["covering"]
    boxes = pq.read_table(streamed["path"], columns=["bbox", "fid"]).sort_by("fid")
    assert boxes["bbox"].combine_chunks().field("xmin").to_numpy() == pytest.approx(
        shapely.bounds(whole.geometry.values)[:, 0]
    )


def _parquet(frame, path) -> str:
    frame.to_parquet(path)
    return str(path)


def test_coverage_union_gives_the_unary_result_on_a_coverage(tmp_path):
    from benchmarks.data import voronoi_coverage

    frame = voronoi_coverage(3000, seed=7)
    source = _parquet(frame, tmp_path / "cells.parquet")
    facts = tasks.dissolve(source, str(tmp_path / "d.parquet"), "region_id")
    assert facts["coverage_union_groups"] == facts["rows"] > 1
    assert facts["unary_union_groups"] == 0
    out = geopandas.read_parquet(facts["path"]).set_index("region_id")
    for key, group in frame.groupby("region_id"):
        unary = shapely.union_all(group.geometry.values)
        got = out.loc[key, "geometry"]
        assert shapely.equals(got, unary), key
        assert got.area == pytest.approx(unary.area, rel=1e-9)
        assert got.is_valid


def test_overlapping_polygons_fall_back_to_the_unary_union(tmp_path):
    squares = [shapely.box(0, 0, 2, 2), shapely.box(1, 1, 3, 3), shapely.box(10, 10, 11, 11)]
    frame = geopandas.GeoDataFrame({"region_id": [1, 1, 2]}, geometry=squares, crs=3857)
    facts = tasks.dissolve(
        _parquet(frame, tmp_path / "sq.parquet"), str(tmp_path / "d.parquet"), "region_id"
    )
    assert (facts["coverage_union_groups"], facts["unary_union_groups"]) == (1, 1)
    out = geopandas.read_parquet(facts["path"]).set_index("region_id")
    assert out.loc[1, "geometry"].area == pytest.approx(7.0)
    assert out.loc[2, "geometry"].area == pytest.approx(1.0)


def test_dissolve_parts_joined_equal_the_whole(naturalearth_shp, tmp_path):
    frame = geopandas.read_file(naturalearth_shp)
    frame.loc[:4, "continent"] = None  # null keys: dropped, counted once
    source = _parquet(frame, tmp_path / "c.parquet")
    whole = tasks.dissolve(source, str(tmp_path / "whole.parquet"), "continent")
    plan = tasks.plan_dissolve(source, "continent", memory_limit_mb=64, min_parts=3)
    assert len(plan["parts"]) == 3 and plan["dropped_null_keys"] == 5
    assert plan["parts"][0][0] == 0 and plan["parts"][-1][1] == plan["groups"] == 8
    parts = [
        tasks.dissolve(source, str(tmp_path / f"p{i}.parquet"), "continent", ranks=ranks)
        for i, ranks in enumerate(plan["parts"])
    ]
    joined = tasks.join_dissolved(
        [p["path"] for p in parts], str(tmp_path / "joined.parquet"), "continent", source
    )
    assert pq.read_table(joined["path"]).equals(pq.read_table(whole["path"]))
    assert whole["dropped_null_keys"] == 5  # the plan's count; the parts hold no null key
    assert sum(p["dropped_null_keys"] for p in parts) == 0
    assert sum(p["rows"] for p in parts) == whole["rows"] == 8
    # a range past the keys holds nothing and says so
    empty = tasks.dissolve(source, str(tmp_path / "e.parquet"), "continent", ranks=[9, 10])
    assert empty == {"path": None, "rows": 0, "dropped_null_keys": 0}


def _mixed_countries(naturalearth_shp, tmp_path) -> tuple[Path, geopandas.GeoDataFrame]:
    """The countries as a GeoPackage with some 3D rows, a NULL geometry and a nullable
    integer column: what a whole-frame read would give is the reference."""
    frame = geopandas.read_file(naturalearth_shp)
    frame.loc[frame.index[::9], "geometry"] = shapely.force_3d(frame.geometry.values[::9], z=7.0)
    frame.loc[frame.index[100], "geometry"] = None
    frame["rank"] = pd.array([None if i % 4 == 0 else i for i in range(len(frame))], "Int64")
    source = tmp_path / "mixed.gpkg"
    frame.to_file(source, driver="GPKG", engine="pyogrio")
    return source, geopandas.read_file(source, engine="pyogrio")


def _same_frame(out: geopandas.GeoDataFrame, whole: geopandas.GeoDataFrame) -> None:
    """The same rows, bit for bit: an output is in Hilbert order, and its source row
    numbers put it back in the source's order."""
    assert sorted(out[SOURCE_ROW]) == list(range(len(whole)))
    out = out.sort_values(SOURCE_ROW, ignore_index=True).drop(columns=SOURCE_ROW)
    assert list(out.columns) == list(whole.columns)
    assert out.crs.equals(whole.crs)
    a, b = out.geometry.values, whole.geometry.values
    missing = shapely.is_missing(b)
    assert missing.sum() == 1 and (shapely.is_missing(a) == missing).all()
    assert shapely.equals_exact(a[~missing], b[~missing], tolerance=0).all()
    assert (shapely.has_z(a) == shapely.has_z(b)).all()
    attributes = [c for c in whole.columns if c != "geometry"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(out[attributes]), pd.DataFrame(whole[attributes]), check_dtype=False
    )


def test_streamed_ingest_equals_the_whole_frame_read(naturalearth_shp, tmp_path):
    """Batch by batch (14 batches of 13 rows here, written as 7 row groups) gives exactly
    the rows, attributes and geometries of one whole-frame read, and `geo` metadata for
    the whole file."""
    source, whole = _mixed_countries(naturalearth_shp, tmp_path)
    tmp = tmp_path / "raw.parquet"
    assert ingest_file(source, tmp, batch_rows=13, group_rows=26)["rows"] == 177
    metadata = pq.ParquetFile(tmp).metadata  # groups of at most 26, cut at cell boundaries
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert len(sizes) >= 7 and max(sizes) <= 26
    out = geopandas.read_parquet(tmp)
    _same_frame(out, whole)
    geo = json.loads(pq.ParquetFile(tmp).schema_arrow.metadata[b"geo"])["columns"]["geometry"]
    present = whole.geometry.dropna()
    kinds = {t + (" Z" if z else "") for t, z in zip(present.geom_type, present.has_z, strict=True)}
    assert geo["geometry_types"] == sorted(kinds) == ["MultiPolygon", "MultiPolygon Z"]
    assert geo["bbox"] == pytest.approx(list(whole.total_bounds), rel=1e-15)
    assert pq.read_schema(tmp).field("rank").type == "int64"  # nulls kept, not floats


def test_every_part_reads_the_file_its_survey_saw(naturalearth_shp, tmp_path):
    """The survey pins the source and gives its identity (device, inode, size, mtime);
    a part given it reads that file, and once the name holds another file (replaced
    between the survey and the part), the part refuses it as transient: read again."""
    source, _ = _mixed_countries(naturalearth_shp, tmp_path)
    survey = tasks.survey(str(source), scratch=str(tmp_path / "out.parquet"))
    stat = source.stat()
    assert survey["identity"] == [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]
    part = tasks.ingest(
        str(source), str(tmp_path / "p0"), features=[0, 10], identity=survey["identity"]
    )
    assert part["rows"] == 10
    replacement = tmp_path / "replacement.parquet"
    shutil.copy(source, replacement)
    os.replace(replacement, source)
    with pytest.raises(TransientIOError, match="changed while it was being read"):
        tasks.ingest(
            str(source), str(tmp_path / "p1"), features=[10, 10], identity=survey["identity"]
        )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_ingest_parts_concatenated_equal_the_whole(naturalearth_shp, tmp_path):
    """Feature ranges read apart (GDAL's SetNextByIndex) into Arrow IPC part files and
    concatenated give the whole file in order, with the `geo` metadata of the whole; so
    do row-group ranges of a GeoParquet source."""
    source, whole = _mixed_countries(naturalearth_shp, tmp_path)
    assert tasks.survey(str(source)) == {"features": 177, "splittable": True}
    ranges = [[0, 60], [60, 60], [120, 60]]  # the last range asks for more than is left
    parts = [
        tasks.ingest(str(source), str(tmp_path / f"part{i}"), features=r)
        for i, r in enumerate(ranges)
    ]
    assert [p["rows"] for p in parts] == [60, 60, 57]
    assert [pa.ipc.open_file(p["path"]).read_all().num_rows for p in parts] == [60, 60, 57]
    joined = tasks.concatenate(
        [p["path"] for p in parts],
        str(tmp_path / "joined.parquet"),
        runs=[p["runs"] for p in parts],
        geos=[p["geo"] for p in parts],
    )
    single = tasks.ingest(str(source), str(tmp_path / "single.parquet"))
    _same_frame(geopandas.read_parquet(joined["path"]), whole)
    assert joined["bbox"] == pytest.approx(single["bbox"], rel=1e-15)
    assert joined["geometry_types"] == single["geometry_types"]
    assert pq.read_table(joined["path"]).equals(pq.read_table(single["path"]))

    whole.to_parquet(tmp_path / "in.parquet", row_group_size=50)  # 4 row groups
    groups = [
        tasks.ingest(str(tmp_path / "in.parquet"), str(tmp_path / f"g{i}.parquet"), features=r)
        for i, r in enumerate([[0, 2], [2, 2]])
    ]
    from_groups = tasks.concatenate(
        [g["path"] for g in groups],
        str(tmp_path / "g.parquet"),
        runs=[g["runs"] for g in groups],
        geos=[g["geo"] for g in groups],
    )
    _same_frame(geopandas.read_parquet(from_groups["path"]), whole)


def test_streamed_ingest_counts_bad_rows_across_batches(tmp_path):
    """A refusal found batch by batch still names every bad row, by its row in the file,
    and leaves no output behind. The NaN sits inside a ring, where polygon bounds (GEOS
    skips NaN) would not show it."""
    squares = [shapely.box(i, 0, i + 1, 1) for i in range(100)]
    for row in (3, 57, 98):
        squares[row] = Polygon([(0, 0), (np.nan, 0), (1, 1)])
    frame = geopandas.GeoDataFrame({"region_id": range(100)}, geometry=squares, crs=3857)
    source = tmp_path / "nan.gpkg"
    frame.to_file(source, driver="GPKG", engine="pyogrio")
    with pytest.raises(BadInputError, match=r"in 3 rows, e.g. \[3, 57, 98\]") as raised:
        ingest_file(source, tmp_path / "out.parquet", batch_rows=10)
    assert raised.value.path == str(source)
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    with pytest.raises(BadInputError, match="in 3 rows"):
        tasks.ingest(str(source), str(warehouse / "raw.parquet"))
    assert list(warehouse.iterdir()) == []


def test_a_refused_row_is_named_by_its_row_in_the_file(tmp_path):
    """Rows are checked in slices of row groups; the error still counts from the file's
    first row (the raw file's: it is in Hilbert order; two rows near the pole)."""
    n = ROW_GROUP_ROWS + 15_000
    x = np.linspace(-170, 170, n)
    y = np.zeros(n)
    y[[60_005, 60_007]] = 89.9999  # Web Mercator is not defined near the pole
    frame = geopandas.GeoDataFrame(geometry=geopandas.points_from_xy(x, y), crs=4326)
    raw = tasks.ingest(_parquet(frame, tmp_path / "in.parquet"), str(tmp_path / "raw.parquet"))
    polar = np.flatnonzero(geopandas.read_parquet(raw["path"]).geometry.y > 89).tolist()
    assert len(polar) == 2 and polar[1] > SLICE_ROWS
    with pytest.raises(BadInputError, match=rf"2 feature\(s\) .* rows \{polar}"):
        tasks.reproject(raw["path"], str(tmp_path / "rep.parquet"), "EPSG:3857")


def _shapely_path(geometries: np.ndarray, transformer):
    from geoiso_dagster.spatial import integrity, stream

    moved = stream.transform(geometries, transformer)
    present = ~shapely.is_missing(moved) & ~shapely.is_empty(moved)
    return moved, shapely.bounds(moved), integrity.nonfinite(moved), present


@pytest.mark.parametrize("target", ["EPSG:6933", "EPSG:3857", "EPSG:32633"])
def test_wkb_fast_path_equals_the_shapely_path(naturalearth_shp, target):
    """The reprojection's fast path (coordinates moved inside the WKB) gives the same
    coordinates, bit for bit, as decoding, shapely.transform and encoding; the same
    bounds, non-finite rows and presence; for polygons with holes, multipolygons, 3D,
    empty and null geometries. Slices it cannot take (points, M, big-endian) are left
    to the shapely path."""
    import pyarrow as pa
    import pyproj

    from geoiso_dagster.spatial import wkb

    countries = geopandas.read_file(naturalearth_shp).geometry.values
    holed = shapely.Polygon(
        [(0, 0), (10, 0), (10, 10), (0, 10)], [[(2, 2), (3, 2), (3, 3)], [(5, 5), (6, 5), (6, 6)]]
    )
    geometries = np.array(
        [
            *countries,
            holed,
            shapely.force_3d(holed, z=5.0),
            shapely.force_3d(countries[4], z=-3.0),
            shapely.Polygon(),
            shapely.MultiPolygon(),
            None,
        ],
        dtype=object,
    )
    transformer = pyproj.Transformer.from_crs(4326, target, always_xy=True)
    array = pa.array(shapely.to_wkb(geometries, flavor="iso"), type=pa.binary())
    fast = wkb.transform(array.slice(3), transformer)  # a slice: offsets into the buffers
    moved, bounds, nonfinite, present = _shapely_path(geometries[3:], transformer)
    got = shapely.from_wkb(fast.wkb.to_numpy(zero_copy_only=False))
    missing = shapely.is_missing(moved)
    assert (shapely.is_missing(got) == missing).all()
    assert shapely.equals_exact(got[~missing], moved[~missing], tolerance=0).all()
    np.testing.assert_array_equal(
        shapely.get_coordinates(got, include_z=True), shapely.get_coordinates(moved, include_z=True)
    )
    np.testing.assert_array_equal(fast.bounds, bounds)
    assert (fast.nonfinite == nonfinite).all() and (fast.present == present).all()
    assert (shapely.has_z(got) == shapely.has_z(moved)).all()

    for unsupported in (
        [shapely.Point(1, 2), holed],
        [shapely.from_wkt("POLYGON M ((0 0 1, 1 0 1, 1 1 1, 0 0 1))")],
    ):
        wkbs = pa.array(shapely.to_wkb(np.array(unsupported), flavor="iso", output_dimension=4))
        assert wkb.transform(wkbs, transformer) is None
    big_endian = pa.array([shapely.to_wkb(holed, byte_order=0)], type=pa.binary())
    assert wkb.transform(big_endian, transformer) is None


def test_wkb_fast_path_names_rows_the_target_cannot_hold(tmp_path):
    """Polygons reaching the pole into Web Mercator are refused by row on the fast path
    as on the shapely one."""
    polygons = [shapely.box(i, 0, i + 1, 1) for i in range(30)]
    polygons[17] = shapely.box(0, 80, 10, 90)
    frame = geopandas.GeoDataFrame(geometry=polygons, crs=4326)
    raw = tasks.ingest(_parquet(frame, tmp_path / "in.parquet"), str(tmp_path / "raw.parquet"))
    row = int(np.flatnonzero(geopandas.read_parquet(raw["path"]).bounds["maxy"] == 90)[0])
    with pytest.raises(BadInputError, match=rf"1 feature\(s\) .* rows \[{row}\]"):
        tasks.reproject(raw["path"], str(tmp_path / "rep.parquet"), "EPSG:3857")


def test_fan_out_parts_are_read_not_memory_mapped(tmp_path):
    """A mapped part counts against the worker's address-space limit for as long as it
    is open, and parts grow with the file: the join reads them, batch by batch."""
    import pyarrow as pa

    from geoiso_dagster.spatial import stream

    table = pa.table({"x": list(range(1000))})
    path = tmp_path / "part.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    schema, tables = stream.part_tables(path)
    first = next(tables)
    assert first.num_rows == 1000 and schema == table.schema
    assert str(path) not in Path("/proc/self/maps").read_text()
