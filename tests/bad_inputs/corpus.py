"""The bad-input corpus: every case is made in code, in a temporary folder.

Each Case builds one source file and says what must happen to it through the chain
ingest -> reproject(target) -> dissolve(by): either every step succeeds (and `verify`
checks the output), or step `fails_at` raises BadInputError naming the step's input
file with `cause` in its message. README.md beside this file lists the cases.
"""

import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import flatbuffers
import flatbuffers.table
import geopandas
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import shapely
from shapely.geometry import LineString, Point, Polygon, box

FIXTURES = Path(pyogrio.__file__).parent / "tests" / "fixtures"
NATURAL_EARTH = FIXTURES / "naturalearth_lowres" / "naturalearth_lowres.shp"


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    build: Callable[[Path], Path]
    fails_at: str | None = None  # "ingest", "reproject", "dissolve", or None: succeeds
    cause: str = ""
    target_crs: str = "EPSG:3857"
    dissolve_by: str = "region_id"
    verify: Callable[[geopandas.GeoDataFrame], None] | None = None


def _frame(geometries, crs="EPSG:4326", **columns) -> geopandas.GeoDataFrame:
    columns = columns or {"region_id": [1] * len(geometries)}
    return geopandas.GeoDataFrame(columns, geometry=list(geometries), crs=crs)


def _parquet(name: str, frame_fn: Callable[[], geopandas.GeoDataFrame]):
    def build(folder: Path) -> Path:
        path = folder / name
        frame_fn().to_parquet(path)
        return path

    return build


def _text(name: str, text: str | bytes):
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    return build


def _geojson(features: list[dict], crs_name: str | None = None) -> str:
    doc: dict = {"type": "FeatureCollection", "features": features}
    if crs_name:
        doc = {
            "type": "FeatureCollection",
            "crs": {"type": "name", "properties": {"name": crs_name}},
            "features": features,
        }
    return json.dumps(doc)


def _feature(geometry: dict, **properties) -> dict:
    return {"type": "Feature", "properties": properties, "geometry": geometry}


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}


def _shapefile(name: str, skip: tuple[str, ...] = (), mutate: Callable[[Path], None] | None = None):
    def build(folder: Path) -> Path:
        for part in NATURAL_EARTH.parent.glob("naturalearth_lowres.*"):
            if part.suffix not in skip:
                shutil.copy(part, folder / f"{name}{part.suffix}")
        shp = folder / f"{name}.shp"
        if mutate:
            mutate(shp)
        return shp

    return build


def _truncate(suffix: str, keep: float):
    def mutate(shp: Path) -> None:
        part = shp.with_suffix(suffix)
        data = part.read_bytes()
        part.write_bytes(data[: int(len(data) * keep)])

    return mutate


def _garbage_prj(shp: Path) -> None:
    shp.with_suffix(".prj").write_text("this is not a coordinate reference system")


def _latin1_shapefile(folder: Path) -> Path:
    frame = _frame([box(0, 0, 1, 1)], name=["Zürich"], region_id=[1])
    path = folder / "latin1.shp"
    frame.to_file(path, encoding="ISO-8859-1")
    assert path.with_suffix(".cpg").read_text().strip().upper() in ("ISO-8859-1", "LATIN1", "88591")
    return path


def _nan_in_ring(folder: Path) -> Path:
    path = folder / "nan_ring.gpkg"
    ring = Polygon([(0, 0), (np.nan, 0), (1, 1)])
    _frame([box(0, 0, 1, 1), ring], region_id=[1, 1]).to_file(path, layer="parcels")
    return path


def _gpkg_declaring_more(folder: Path) -> Path:
    path = folder / "overclaims.gpkg"
    _frame([box(0, 0, 1, 1), box(1, 0, 2, 1)], region_id=[1, 2]).to_file(path, layer="parcels")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE gpkg_ogr_contents SET feature_count = 1000000")
    return path


def _truncated_parquet(folder: Path) -> Path:
    path = folder / "truncated.parquet"
    geopandas.read_file(NATURAL_EARTH).to_parquet(path)
    path.write_bytes(path.read_bytes()[:20000])
    return path


def _plain_parquet(folder: Path) -> Path:
    path = folder / "plain.parquet"
    pq.write_table(pa.table({"region_id": [1], "geometry": [Point(0, 0).wkb]}), path)
    return path


def _duplicate_columns(folder: Path) -> Path:
    path = folder / "duplicates.parquet"
    _frame([box(0, 0, 1, 1)]).to_parquet(path)
    table = pq.read_table(path)
    doubled = pa.table(
        [table["region_id"], table["region_id"], table["geometry"]],
        names=["region_id", "region_id", "geometry"],
    ).replace_schema_metadata(table.schema.metadata)
    pq.write_table(doubled, path)
    return path


def _curves(folder: Path) -> Path:
    path = folder / "curves.gpkg"
    shutil.copy(FIXTURES / "curvepolygon.gpkg", path)
    return path


def _measured_line(folder: Path) -> Path:
    path = folder / "measured.gpkg"
    shutil.copy(FIXTURES / "line_zm.gpkg", path)
    return path


def _measured_polygons() -> geopandas.GeoDataFrame:
    return _frame(
        [
            shapely.from_wkt("POLYGON ZM ((0 0 1 5, 2 0 1 6, 2 2 1 7, 0 0 1 5))"),
            shapely.from_wkt("POLYGON M ((2 0 1, 4 0 2, 4 2 3, 2 0 1))"),
        ],
        region_id=[1, 1],
    )


def _keeps_z(out: geopandas.GeoDataFrame) -> None:
    assert len(out) == 1 and shapely.is_valid(out.geometry.iloc[0])
    z = shapely.get_coordinates(out.geometry.values, include_z=True)[:, 2]
    assert np.isfinite(z[~np.isnan(z)]).all() and (z[~np.isnan(z)] == 1).any()


def _empty_layer(folder: Path) -> Path:
    path = folder / "empty_layer.gpkg"
    frame = _frame([box(0, 0, 1, 1)])
    frame.iloc[:0].to_file(path, layer="nothing")
    return path


def _zero_bytes(folder: Path) -> Path:
    path = folder / "zero.gpkg"
    path.touch()
    return path


def _check_both_lobes(out: geopandas.GeoDataFrame) -> None:
    assert len(out) == 1 and out.geometry.iloc[0].area == pytest_approx(2.0)


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-9)


def _rows(n: int, **expect_columns):
    def verify(out: geopandas.GeoDataFrame) -> None:
        assert len(out) == n, (len(out), n)
        for column, values in expect_columns.items():
            assert sorted(out[column].tolist()) == sorted(values), out[column].tolist()

    return verify


def _valid_area(total: float):
    def verify(out: geopandas.GeoDataFrame) -> None:
        assert shapely.is_valid(out.geometry.values).all()
        assert out.geometry.area.sum() == pytest_approx(total)

    return verify


# -- the jail and silent wrong results (issue 9): files that tried to escape or mislead --

OUTSIDE_GPKG = FIXTURES / "test_gpkg_nulls.gpkg"  # a real GeoPackage outside the data root


def _vrt(name: str, source: str) -> Callable[[Path], Path]:
    text = (
        '<OGRVRTDataSource><OGRVRTLayer name="x"><SrcDataSource>'
        f"{source}</SrcDataSource></OGRVRTLayer></OGRVRTDataSource>"
    )
    return _text(name, text)


def _dbf_link_outside(folder: Path) -> Path:
    shp = _shapefile("linked_dbf")(folder)
    shp.with_suffix(".dbf").unlink()
    shp.with_suffix(".dbf").symlink_to(NATURAL_EARTH.with_suffix(".dbf"))
    return shp


def _fifo_dbf(folder: Path) -> Path:
    import os

    shp = _shapefile("fifo_dbf")(folder)
    shp.with_suffix(".dbf").unlink()
    os.mkfifo(shp.with_suffix(".dbf"))
    return shp


def _directory_named_gpkg(folder: Path) -> Path:
    path = folder / "folder.gpkg"
    path.mkdir()
    for part in NATURAL_EARTH.parent.glob("naturalearth_lowres.*"):
        (path / part.name).symlink_to(part)
    return path


def _zipped(name: str, mutate=None, arcdir: str = ""):
    def build(folder: Path) -> Path:
        import zipfile

        work = folder / "parts"
        work.mkdir()
        shp = _shapefile("countries", mutate=mutate)(work)
        path = folder / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for part in sorted(work.iterdir()):
                archive.write(part, arcdir + part.name)
        shutil.rmtree(work)
        assert shp.suffix == ".shp"
        return path

    return build


def _zip_with_link(folder: Path) -> Path:
    import zipfile

    path = folder / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("countries.shp")
        info.external_attr = 0o120777 << 16  # a symbolic link member
        archive.writestr(info, "/etc/passwd")
    return path


def _zip_bomb(folder: Path) -> Path:
    import zipfile

    path = folder / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("big.geojson", "w") as member:
            block = b" " * 2**20
            for _ in range(200):  # 200 MiB of blanks: about 200 kB deflated
                member.write(block)
    return path


def _pending_wal(folder: Path) -> Path:
    path = folder / "edited.gpkg"
    _frame([box(i, 0, i + 1, 1) for i in range(10)], region_id=list(range(10))).to_file(
        path, layer="parcels"
    )
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("DELETE FROM parcels WHERE fid > 5")
    db.commit()
    # Left open on purpose: the -wal now holds the committed delete, as while QGIS edits.
    _OPEN_DATABASES.append(db)
    assert path.with_name(path.name + "-wal").stat().st_size > 0
    return path


_OPEN_DATABASES: list = []


def _two_layers(folder: Path) -> Path:
    path = folder / "two_layers.gpkg"
    _frame([box(0, 0, 1, 1)] * 5, region_id=[1] * 5).to_file(path, layer="small")
    _frame([box(0, 0, 1, 1)] * 20, region_id=[2] * 20).to_file(path, layer="large")
    return path


def _crs_link_geojson() -> str:
    doc = json.loads(_geojson([_feature({"type": "Point", "coordinates": [600000, 100000]})]))
    doc["crs"] = {"type": "link", "properties": {"href": "3857.proj4", "type": "proj4"}}
    return json.dumps(doc)


def _case_siblings(folder: Path) -> Path:
    _shapefile("world")(folder)
    return _shapefile("World")(folder)


def _list_and_struct(folder: Path) -> Path:
    path = folder / "nested.parquet"
    _frame([box(0, 0, 1, 1), box(1, 0, 2, 1)], region_id=[1, 2]).to_parquet(path)
    table = pq.read_table(path)
    table = table.append_column("tags", pa.array([["a"], ["b", "c"]]))
    table = table.append_column("owner", pa.array([{"id": 1}, {"id": 2}]))
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), path)
    return path


GRID_BY_PATH_WKT = (
    'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433],'
    'EXTENSION["PROJ4","+proj=longlat +ellps=WGS84 +nadgrids=/etc/passwd +no_defs"]]'
)


def _prj_grid_by_path(shp: Path) -> None:
    shp.with_suffix(".prj").write_text(GRID_BY_PATH_WKT)


def _gpkg_srs_grid(folder: Path) -> Path:
    path = folder / "srs_grid.gpkg"
    _frame([box(0, 0, 1, 1)]).to_file(path)
    with sqlite3.connect(path) as connection:
        connection.execute(
            "UPDATE gpkg_spatial_ref_sys SET definition = ? WHERE srs_id = 4326",
            (GRID_BY_PATH_WKT,),
        )
    return path


def _geo_column(name: str, **fields):
    """A one-square GeoParquet whose `geo` geometry column carries `fields` (a CRS, edges)
    as a hostile or careless writer put them."""

    def build(folder: Path) -> Path:
        path = folder / name
        _frame([box(0, 0, 1, 1)]).to_parquet(path)
        table = pq.read_table(path)
        geo = json.loads(table.schema.metadata[b"geo"])
        geo["columns"]["geometry"].update(fields)
        pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo)}), path)
        return path

    return build


def _geoparquet_crs(name: str, crs: object):
    return _geo_column(name, crs=crs)


def _fgb_same_column_twice(folder: Path) -> Path:
    path = folder / "twice.fgb"
    _frame([box(0, 0, 1, 1)], region_id=[1], region_ix=[2]).to_file(path, SPATIAL_INDEX="NO")
    data = path.read_bytes()
    size = 12 + int.from_bytes(data[8:12], "little")
    path.write_bytes(data[:size].replace(b"region_ix", b"region_id") + data[size:])
    return path


def _fgb_field(data: bytes, field: int) -> int:
    """Where a FlatGeobuf header's scalar `field` lies in the file (FlatBuffers layout,
    read here with the format's own runtime, independently of the package's reader)."""
    buf = bytearray(data[12:])
    root = flatbuffers.table.Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))
    return 12 + root.Pos + root.Offset(4 + 2 * field)


def _fgb_count_lies(folder: Path) -> Path:
    path = folder / "lies.fgb"
    geopandas.read_file(NATURAL_EARTH).to_file(path, SPATIAL_INDEX="NO")
    data = bytearray(path.read_bytes())
    at = _fgb_field(data, 8)  # features_count, a uint64
    assert int.from_bytes(data[at : at + 8], "little") == 177
    data[at : at + 8] = (5).to_bytes(8, "little")
    path.write_bytes(data)
    return path


def _fgb_truncated(folder: Path) -> Path:
    path = folder / "cut.fgb"
    geopandas.read_file(NATURAL_EARTH).to_file(path)  # with its spatial index
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _shx_all_first(shp: Path) -> None:
    """Every .shx entry points at the first record (its offset and length)."""
    shx = shp.with_suffix(".shx")
    data = shx.read_bytes()
    shx.write_bytes(data[:100] + data[100:108] * ((len(data) - 100) // 8))


def _gpkg_blob_srs(folder: Path) -> Path:
    """The layer declares EPSG:4326; its blobs say 3857 (the header's srs_id, bytes 4-8,
    in the byte order flag bit 0 gives)."""
    path = folder / "blob_srs.gpkg"
    frame = _frame([box(0, 0, 1, 1), box(1, 0, 2, 1)], region_id=[1, 2])
    frame.to_file(path, layer="parcels", SPATIAL_INDEX="NO")  # no triggers calling ST_*
    with sqlite3.connect(path) as db:
        for fid, blob in db.execute("SELECT fid, geom FROM parcels").fetchall():
            order = "little" if blob[3] & 1 else "big"
            assert int.from_bytes(blob[4:8], order) == 4326
            srs = (3857).to_bytes(4, order)
            db.execute(
                "UPDATE parcels SET geom = ? WHERE fid = ?", (blob[:4] + srs + blob[8:], fid)
            )
    return path


def _gpkg_endless_view(folder: Path) -> Path:
    """The only feature layer is a view over a recursive CTE that never ends."""
    path = folder / "endless.gpkg"
    _frame([box(0, 0, 1, 1)]).to_file(path, layer="parcels")
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE VIEW forever AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
            "FROM n) SELECT n.i AS fid, p.geom AS geom, p.region_id AS region_id "
            "FROM n, parcels p"
        )
        db.execute("UPDATE gpkg_contents SET table_name = 'forever'")
        db.execute("UPDATE gpkg_geometry_columns SET table_name = 'forever'")
    return path


def _parquet_dictionary_bad_utf8(folder: Path) -> Path:
    """A dictionary-encoded string column whose dictionary holds invalid UTF-8 (written
    as binary and relabelled, as a hostile writer would)."""
    path = folder / "dictionary.parquet"
    _frame([box(0, 0, 1, 1), box(1, 0, 2, 1)], region_id=[1, 1]).to_parquet(path)
    table = pq.read_table(path)
    values = pa.array([b"ok", b"\xff\xfe bad"], pa.binary()).view(pa.string())
    names = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), values)
    pq.write_table(table.append_column("name", names), path)
    return path


def _parquet_row_bomb(folder: Path) -> Path:
    """20,000,000 rows of one dictionary-encoded point: a file of a few hundred KB."""
    path = folder / "bomb.parquet"
    rows = 20_000_000
    point = shapely.to_wkb(shapely.Point(1, 1))
    geometry = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(rows, dtype=np.int32)), pa.array([point], pa.binary())
    )
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Point"]}},
    }
    table = pa.table({"region_id": pa.array(np.zeros(rows, dtype=np.int8)), "geometry": geometry})
    pq.write_table(table.replace_schema_metadata({"geo": json.dumps(geo)}), path)
    assert path.stat().st_size < 1_000_000
    return path


def _cpg(value: bytes):
    def mutate(shp: Path) -> None:
        shp.with_suffix(".cpg").write_bytes(value)

    return mutate


LOCAL_CS_WKT = (
    'LOCAL_CS["site grid",LOCAL_DATUM["site",0],UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]'
)


def _prj(text: str):
    def mutate(shp: Path) -> None:
        shp.with_suffix(".prj").write_text(text)

    return mutate


def _parts_of_another(shp: Path) -> None:
    """The .shx and .dbf of another delivery (the first 50 countries, written apart)."""
    other = shp.parent / "other" / "other.shp"
    other.parent.mkdir()
    geopandas.read_file(NATURAL_EARTH).head(50).to_file(other)
    for part in (".shx", ".dbf"):
        shutil.copy(other.with_suffix(part), shp.with_suffix(part))
    shutil.rmtree(other.parent)


def _geojson_with_crs(crs: dict, geometry_crs: dict | None = None, escape: bool = False) -> str:
    geometry = dict(SQUARE, **({"crs": geometry_crs} if geometry_crs else {}))
    doc = json.loads(_geojson([_feature(geometry, region_id=1)]))
    doc["crs"] = crs
    text = json.dumps(doc)
    return text.replace('"crs"', '"cr\\u0073"') if escape else text


NAMED_4326 = {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}}
URL_LINK = {"type": "link", "properties": {"href": "http://127.0.0.1:9/crs.wkt", "type": "wkt"}}


BOUND_CRS_WITH_FILE = (
    'BOUNDCRS[SOURCECRS[GEOGCRS["x",DATUM["d",ELLIPSOID["e",6378137,298.257223563]],'
    'CS[ellipsoidal,2],AXIS["lat",north],AXIS["lon",east],ANGLEUNIT["degree",0.0174532925]]],'
    'TARGETCRS[GEOGCRS["WGS 84",DATUM["d",ELLIPSOID["e",6378137,298.257223563]],'
    'CS[ellipsoidal,2],AXIS["lat",north],AXIS["lon",east],ANGLEUNIT["degree",0.0174532925]]],'
    'ABRIDGEDTRANSFORMATION["t",METHOD["NTv2"],'
    'PARAMETERFILE["Latitude and longitude difference file","/tmp/geoiso-probe.gsb"]]]'
)


BOWTIE = Polygon([(0, 0), (2, 2), (2, 0), (0, 2), (0, 0)])
# A ring that touches itself at one point, enclosing a hole: the "inverted" hole form.
SELF_TOUCHING = Polygon([(0, 0), (4, 0), (4, 4), (2, 4), (3, 2), (1, 2), (2, 4), (0, 4), (0, 0)])

CASES: list[Case] = [
    Case(
        "no_crs",
        "shapefile without its .prj",
        _shapefile("no_crs", skip=(".prj",)),
        "ingest",
        "no coordinate reference system",
    ),
    Case(
        "garbage_prj",
        ".prj holding text that is no CRS",
        _shapefile("garbage_prj", mutate=_garbage_prj),
        "ingest",
        "no coordinate reference system",
    ),
    Case(
        "unknown_crs_geojson",
        "GeoJSON declaring EPSG:999999 (GDAL would read it as WGS 84)",
        _text(
            "unknown_crs.geojson",
            _geojson([_feature(SQUARE, region_id=1)], "urn:ogc:def:crs:EPSG::999999"),
        ),
        "ingest",
        "which PROJ does not know",
    ),
    Case(
        "garbage_projjson",
        "GeoParquet whose PROJJSON names no real CRS",
        _geo_column(
            "garbage_projjson.parquet",
            crs={"type": "GeographicCRS", "name": "not a real datum"},
        ),
        "ingest",
        "Invalid projection",
    ),
    Case("zero_bytes", "a 0-byte .gpkg", _zero_bytes, "ingest", "empty (0 bytes)"),
    Case(
        "zero_features_geojson",
        "a FeatureCollection with no features",
        _text("none.geojson", _geojson([])),
        "ingest",
        "no features",
    ),
    Case(
        "zero_features_gpkg",
        "a GeoPackage layer with no rows",
        _empty_layer,
        "ingest",
        "no features",
    ),
    Case(
        "truncated_geoparquet",
        "GeoParquet cut after 20 kB",
        _truncated_parquet,
        "ingest",
        "not readable Parquet",
    ),
    Case(
        "parquet_without_geo",
        "Parquet with a WKB column but no 'geo' metadata",
        _plain_parquet,
        "ingest",
        "without GeoParquet 'geo' metadata",
    ),
    Case(
        "geojson_syntax_error",
        "GeoJSON cut mid-object",
        _text("broken.geojson", '{"type": "FeatureCollection", "features": [ {"type": "Feat'),
        "ingest",
        "cannot be read as vector data",
    ),
    Case(
        "shapefile_without_shx",
        "shapefile missing its .shx",
        _shapefile("no_shx", skip=(".shx",)),
        "ingest",
        "missing its .shx",
    ),
    Case(
        "shapefile_without_dbf",
        "shapefile missing its .dbf (GDAL reads it attribute-less)",
        _shapefile("no_dbf", skip=(".dbf",)),
        "ingest",
        "missing its .dbf",
    ),
    Case(
        "truncated_shp",
        ".shp cut in half (GDAL reads null geometries)",
        _shapefile("cut_shp", mutate=_truncate(".shp", 0.5)),
        "ingest",
        "is truncated",
    ),
    Case(
        "dbf_declares_more",
        ".dbf declaring 177 records, holding half (GDAL reads 88 rows)",
        _shapefile("cut_dbf", mutate=_truncate(".dbf", 0.5)),
        "ingest",
        "declares 177 records",
    ),
    Case(
        "gpkg_declares_more",
        "GeoPackage whose feature count claims 1,000,000 rows, holds 2",
        _gpkg_declaring_more,
        "ingest",
        "declares 1000000 features but 2",
    ),
    Case(
        "geojson_named_gpkg",
        "GeoJSON content with a .gpkg extension: the suffix decides the format's checks",
        _text("actually_geojson.gpkg", _geojson([_feature(SQUARE, region_id=1)])),
        "ingest",
        "is named .gpkg but its content is not GPKG data",
    ),
    Case(
        "random_bytes",
        "5 kB of noise named .geojson",
        _text("noise.geojson", bytes(range(256)) * 20),
        "ingest",
        "its content is not GeoJSON data",
    ),
    Case(
        "non_utf8_geojson",
        "GeoJSON whose text is Latin-1, not UTF-8",
        _text(
            "latin1.geojson",
            _geojson([_feature(SQUARE, region_id=1, name="@@")])
            .replace("@@", "Zürich")
            .encode("latin-1"),
        ),
        "ingest",
        "not valid UTF-8",
    ),
    Case(
        "latin1_shapefile_with_cpg",
        "Latin-1 shapefile that says so in its .cpg",
        _latin1_shapefile,
        verify=_rows(1, name=["Zürich"]),
    ),
    Case(
        "mixed_geometry_types",
        "points, a line and polygons in one layer",
        _parquet(
            "mixed.parquet",
            lambda: _frame(
                [Point(0, 0), LineString([(0, 0), (1, 1)]), box(0, 0, 1, 1), box(1, 0, 2, 1)]
            ),
        ),
        verify=_rows(1, feature_count=[2]),
    ),
    Case(
        "null_geometries",
        "rows without geometry",
        _parquet("nulls.parquet", lambda: _frame([None, box(0, 0, 1, 1)])),
        verify=_rows(1, feature_count=[1]),
    ),
    Case(
        "empty_geometries",
        "empty polygons beside a real one",
        _parquet("empties.parquet", lambda: _frame([Polygon(), box(0, 0, 1, 1)])),
        verify=_rows(1, feature_count=[1]),
    ),
    Case(
        "only_lines",
        "nothing polygonal to dissolve",
        _parquet("lines.parquet", lambda: _frame([LineString([(0, 0), (1, 1)])])),
        "dissolve",
        "no polygonal geometries",
    ),
    Case(
        "three_d",
        "polygons with Z",
        _parquet(
            "z.parquet",
            lambda: _frame(
                [Polygon([(0, 0, 5), (1, 0, 5), (1, 1, 5), (0, 0, 5)])], crs="EPSG:3857"
            ),
        ),
        verify=_valid_area(0.5),
    ),
    Case(
        "measured_line",
        "a ZM line (pyogrio fixture): read and reprojected, no key to dissolve by",
        _measured_line,
        "dissolve",
        "is not in the data",
    ),
    Case(
        "measured_polygons",
        "XYZM and XYM polygons: M dropped before the transform, Z kept",
        _parquet("measured.parquet", _measured_polygons),
        target_crs="EPSG:4326",
        verify=_keeps_z,
    ),
    Case(
        "bowtie",
        "self-intersecting ring: both lobes must survive",
        _parquet("bowtie.parquet", lambda: _frame([BOWTIE], crs="EPSG:3857")),
        verify=_valid_area(2.0),
    ),
    Case(
        "self_touching_ring",
        "a ring touching itself around a hole",
        _parquet("touching.parquet", lambda: _frame([SELF_TOUCHING], crs="EPSG:3857")),
        verify=_valid_area(SELF_TOUCHING.area),
    ),
    Case(
        "unclosed_ring",
        "GeoJSON polygon whose ring is not closed",
        _text(
            "unclosed.geojson",
            _geojson(
                [
                    _feature(
                        {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]},
                        region_id=1,
                    )
                ]
            ),
        ),
        "ingest",
        "closed linestring",
    ),
    Case(
        "nan_coordinates",
        "a NaN coordinate",
        _parquet("nan.parquet", lambda: _frame([Point(np.nan, 1), box(0, 0, 1, 1)])),
        "ingest",
        "NaN or infinite",
    ),
    Case(
        "nan_inside_ring",
        "a NaN inside a polygon's ring (GeoPackage): GEOS leaves it out of the bounds",
        _nan_in_ring,
        "ingest",
        "NaN or infinite",
    ),
    Case(
        "inf_coordinates",
        "an infinite coordinate",
        _parquet("inf.parquet", lambda: _frame([Polygon([(0, 0), (np.inf, 0), (1, 1)])])),
        "ingest",
        "NaN or infinite",
    ),
    Case(
        "huge_coordinates",
        "longitude 1e300 in WGS 84: refused where it enters, at ingest",
        _parquet("huge.parquet", lambda: _frame([box(0, 0, 1e300, 1)])),
        "ingest",
        "outside what its CRS (EPSG:4326) can hold",
        target_crs="EPSG:6933",
    ),
    Case(
        "pole_into_web_mercator",
        "a polygon reaching the North Pole into EPSG:3857",
        _parquet("pole.parquet", lambda: _frame([box(-10, 80, 10, 90), box(0, 0, 1, 1)])),
        "reproject",
        "far outside where it is defined",
    ),
    Case(
        "antimeridian",
        "Fiji-like polygon crossing 180° (170..190) into a Pacific CRS",
        _parquet("antimeridian.parquet", lambda: _frame([box(170, -20, 190, -10)])),
        target_crs="EPSG:3832",
        verify=_rows(1),
    ),
    Case(
        "dissolve_key_missing",
        "no region_id column",
        _parquet("nokey.parquet", lambda: _frame([box(0, 0, 1, 1)], other=[1])),
        "dissolve",
        "is not in the data",
    ),
    Case(
        "dissolve_key_all_null",
        "region_id null in every row",
        _parquet("nullkey.parquet", lambda: _frame([box(0, 0, 1, 1)], region_id=[None])),
        "dissolve",
        "null in every row",
    ),
    Case(
        "dissolve_key_mixed_types",
        "region_id 1 and 'a' in one GeoJSON column",
        _text(
            "mixedkey.geojson",
            _geojson([_feature(SQUARE, region_id=1), _feature(SQUARE, region_id="a")]),
        ),
        verify=_rows(2),
    ),
    Case(
        "duplicate_column_names",
        "Parquet with two region_id columns",
        _duplicate_columns,
        "ingest",
        "duplicate column names",
    ),
    Case("curved_geometries", "CurvePolygons (GeoPackage)", _curves, "ingest", "CONVERT_TO_LINEAR"),
    # -- the jail --
    Case(
        "vrt_named_gpkg",
        "an OGR VRT named .gpkg reading a GeoPackage outside the data root",
        _vrt("outside.gpkg", str(OUTSIDE_GPKG)),
        "ingest",
        "its content is not GPKG data",
    ),
    Case(
        "vrt_to_url",
        "an OGR VRT (.vrt) whose source is a /vsicurl/ URL",
        _vrt("remote.vrt", "/vsicurl/http://127.0.0.1:9/x.geojson"),
        "ingest",
        "is not on the allow-list",
    ),
    Case(
        "unknown_format",
        "a CSV with WKT: not an allowed format",
        _text("points.csv", 'WKT,region_id\n"POINT (1 1)",1\n'),
        "ingest",
        "is not on the allow-list",
    ),
    Case(
        "dbf_linked_outside",
        "a shapefile whose .dbf is a symlink to a file outside the data root",
        _dbf_link_outside,
        "ingest",
        "outside the data root",
    ),
    Case(
        "dbf_is_a_fifo",
        "a shapefile whose .dbf is a FIFO (reading it would hang)",
        _fifo_dbf,
        "ingest",
        "not a regular file",
    ),
    Case(
        "directory_named_gpkg",
        "a directory named x.gpkg holding symlinks to a shapefile elsewhere",
        _directory_named_gpkg,
        "ingest",
        "is a directory",
    ),
    Case(
        "zip_with_a_link",
        "a zip whose member is a symbolic link to /etc/passwd",
        _zip_with_link,
        "ingest",
        "is a link or special file",
    ),
    Case(
        "zip_bomb",
        "200 MiB of blanks in a 200 kB zip",
        _zip_bomb,
        "ingest",
        "zip bomb",
    ),
    # -- silently wrong results --
    Case(
        "zipped_truncated_shp",
        "a zipped shapefile whose .shp is cut in half (GDAL's /vsizip/ reads null geometries)",
        _zipped("cut.zip", mutate=_truncate(".shp", 0.5)),
        "ingest",
        "is truncated: 112 of 177 records",
    ),
    Case(
        "zipped_shapefile",
        "a good zipped shapefile, its parts in a folder inside the archive",
        _zipped("countries.zip", arcdir="countries/"),
        target_crs="EPSG:6933",
        dissolve_by="continent",
        verify=_rows(8),
    ),
    Case(
        "geojson_crs_link",
        "GeoJSON whose crs member is a link to a projected CRS, coordinates in metres",
        _text("linked_crs.geojson", _crs_link_geojson()),
        "ingest",
        "of type 'link'",
    ),
    Case(
        "gpkg_pending_wal",
        "a GeoPackage in WAL mode whose -wal holds committed deletes",
        _pending_wal,
        "ingest",
        "un-checkpointed changes in edited.gpkg-wal",
    ),
    Case(
        "gpkg_two_layers",
        "a GeoPackage with two layers (5 and 20 rows) and no layer named",
        _two_layers,
        "ingest",
        "has 2 layers: 'small' (5 features), 'large' (20 features)",
    ),
    Case(
        "feature_count_column",
        "a source that already has a feature_count column",
        _parquet(
            "counted.parquet",
            lambda: _frame([box(0, 0, 1, 1)], region_id=[1], feature_count=[42]),
        ),
        "dissolve",
        "has a column 'feature_count'",
    ),
    Case(
        "latitude_1e308",
        "a latitude of 1e308 in WGS 84 (a geographic target would copy it through)",
        _parquet("far.parquet", lambda: _frame([box(0, 0, 1, 1e308)])),
        "ingest",
        "outside what its CRS (EPSG:4326) can hold",
        target_crs="EPSG:4326",
    ),
    Case(
        "projected_1e308",
        "x = 1e308 m in Web Mercator",
        _parquet("far_m.parquet", lambda: _frame([box(0, 0, 1e308, 1)], crs="EPSG:3857")),
        "ingest",
        "within 1e+08 units of the origin",
    ),
    Case(
        "vertical_target_crs",
        "target_crs EPSG:5714 (mean sea level height: a vertical CRS)",
        _parquet("sea_level.parquet", lambda: _frame([box(0, 0, 1, 1)])),
        "reproject",
        "not a horizontal",
        target_crs="EPSG:5714",
    ),
    Case(
        "target_crs_grid_path",
        "target_crs +nadgrids=@x,/abs/path/grid.gsb (PROJ would open the file)",
        _parquet("grid.parquet", lambda: _frame([box(0, 0, 1, 1)])),
        "reproject",
        "names a file path",
        target_crs="+proj=longlat +ellps=GRS80 +nadgrids=@x,/tmp/geoiso-probe.gsb",
    ),
    Case(
        "target_crs_parameterfile",
        "target_crs: a WKT BOUNDCRS whose PARAMETERFILE names an absolute path",
        _parquet("bound.parquet", lambda: _frame([box(0, 0, 1, 1)])),
        "reproject",
        "PARAMETERFILE",
        target_crs=BOUND_CRS_WITH_FILE,
    ),
    Case(
        "dissolve_by_list_column",
        "dissolve_by names a list-valued column",
        _list_and_struct,
        "dissolve",
        "holds list<",
        dissolve_by="tags",
    ),
    Case(
        "dissolve_by_struct_column",
        "dissolve_by names a struct column",
        _list_and_struct,
        "dissolve",
        "holds struct<",
        dissolve_by="owner",
    ),
    Case(
        "case_different_siblings",
        "World.shp beside world.shp: each takes only its exact-stem parts",
        _case_siblings,
        target_crs="EPSG:6933",
        dissolve_by="continent",
        verify=_rows(8),
    ),
    Case(
        "prj_grid_by_path",
        "a shapefile whose .prj WKT carries a PROJ4 extension naming a grid by absolute path",
        _shapefile("grid_prj", mutate=_prj_grid_by_path),
        "ingest",
        "names a file path",
    ),
    Case(
        "gpkg_srs_grid_by_path",
        "a GeoPackage whose gpkg_spatial_ref_sys definition names a grid by absolute path",
        _gpkg_srs_grid,
        "ingest",
        "the CRS its gpkg_spatial_ref_sys declares (srs_id 4326)",
    ),
    Case(
        "geoparquet_crs_init_file",
        "a GeoParquet whose geo CRS is the string +init=<outside file>:1",
        _geoparquet_crs("init.parquet", "+init=/etc/passwd:1"),
        "ingest",
        "the CRS its geo metadata declares",
    ),
    Case(
        "geoparquet_projjson_grid_file",
        "a GeoParquet whose PROJJSON BoundCRS names its NTv2 file outside the root",
        _geoparquet_crs(
            "bound.parquet",
            {"type": "BoundCRS", "transformation": {"parameters": [{"parameter_file": "/x.gsb"}]}},
        ),
        "ingest",
        "references a file ('parameter_file')",
    ),
    Case(
        "fgb_same_column_twice",
        "a FlatGeobuf whose header declares two columns of the same name",
        _fgb_same_column_twice,
        "ingest",
        "declares the column 'region_id' twice",
    ),
    Case(
        "geojson_escaped_crs_link",
        'GeoJSON whose crs key is written "cr\\u0073", a link to a URL',
        _text("escaped.geojson", _geojson_with_crs(URL_LINK, escape=True)),
        "ingest",
        "of type 'link'",
    ),
    Case(
        "geojson_link_with_decoy",
        "GeoJSON whose link crs member holds a named EPSG:4326 crs inside it",
        _text("decoy.geojson", _geojson_with_crs(dict(URL_LINK, crs=NAMED_4326))),
        "ingest",
        "of type 'link'",
    ),
    Case(
        "geojson_geometry_crs_link",
        "GeoJSON named CRS84 at the root, a link in one geometry's own crs member",
        _text("geometry_link.geojson", _geojson_with_crs(NAMED_4326, URL_LINK)),
        "ingest",
        "of type 'link'",
    ),
    Case(
        "geojson_named_fgb",
        "a GeoJSON with a link crs, renamed .fgb (GDAL would open it as GeoJSON)",
        _text("renamed.fgb", _geojson_with_crs(URL_LINK)),
        "ingest",
        "is named .fgb but its content is not FlatGeobuf data",
    ),
    Case(
        "geojson_same_crs_twice",
        "GeoJSON naming CRS84 at the root and again in a geometry: one CRS, read",
        _text("twice.geojson", _geojson_with_crs(NAMED_4326, NAMED_4326)),
        target_crs="EPSG:6933",
        verify=_rows(1),
    ),
    Case(
        "fgb_header_count_lies",
        "a FlatGeobuf (no index) whose header declares 5 features while 177 are stored",
        _fgb_count_lies,
        "ingest",
        "its FlatGeobuf header declares 5 features but 177 are stored",
    ),
    Case(
        "fgb_truncated",
        "a FlatGeobuf with its spatial index whose last 100 bytes are cut off",
        _fgb_truncated,
        "ingest",
        "is not whole FlatGeobuf: after 176 features (its header declares 177)",
    ),
    Case(
        "shx_all_first_record",
        "a shapefile whose .shx points every record at the first shape",
        _shapefile("echo", mutate=_shx_all_first),
        "ingest",
        "its index (.shx) is not in the order of the .shp's records: 176 entries",
    ),
    Case(
        "gpkg_blob_srs_differs",
        "a GeoPackage layer in EPSG:4326 whose geometry blobs declare srs_id 3857",
        _gpkg_blob_srs,
        "ingest",
        "2 geometries of layer 'parcels' declare srs_id 3857 while the layer declares 4326",
    ),
    Case(
        "gpkg_endless_view",
        "a GeoPackage whose only layer is a view over an endless recursive CTE",
        _gpkg_endless_view,
        "ingest",
        "its layer 'forever' is a view, not a table",
    ),
    Case(
        "parquet_dictionary_bad_utf8",
        "a GeoParquet whose dictionary-encoded string column holds invalid UTF-8",
        _parquet_dictionary_bad_utf8,
        "ingest",
        "column 'name' holds text that is not valid UTF-8",
    ),
    Case(
        "multipolygon_overlapping_parts",
        "a MultiPolygon of two 2x2 squares overlapping on 1x1 (make_valid's default loses it)",
        _parquet(
            "overlap.parquet",
            lambda: _frame(
                [shapely.MultiPolygon([box(0, 0, 2, 2), box(1, 1, 3, 3)])], crs="EPSG:3857"
            ),
        ),
        verify=_valid_area(7.0),
    ),
    Case(
        "parquet_row_bomb",
        "a GeoParquet of a few hundred KB declaring 20,000,000 rows (one dictionary point)",
        _parquet_row_bomb,
        "ingest",
        "declares 20,000,000 rows in",
    ),
    Case(
        "parquet_spherical_edges",
        "a GeoParquet whose geometry column declares edges: spherical",
        _geo_column("spherical.parquet", edges="spherical"),
        "ingest",
        "declares edges 'spherical'; geoiso's steps are planar",
    ),
    Case(
        "cpg_utf16",
        "a shapefile whose .cpg names UTF-16 (every attribute byte would become other text)",
        _shapefile("wide", mutate=_cpg(b"UTF-16")),
        "ingest",
        "its wide.cpg names the encoding 'UTF-16', which is not an ASCII-compatible",
    ),
    Case(
        "cpg_code_page",
        "a shapefile whose .cpg gives a code page by number (1252), as ArcGIS writes it",
        _shapefile("code_page", mutate=_cpg(b"1252\r\n")),
        target_crs="EPSG:6933",
        dissolve_by="continent",
        verify=_rows(8),
    ),
    Case(
        "prj_local_cs",
        "a shapefile whose .prj is a LOCAL_CS (an engineering CRS: no geographic place)",
        _shapefile("site", mutate=_prj(LOCAL_CS_WKT)),
        "ingest",
        "its declared CRS is an Engineering CRS (site grid), not a horizontal",
    ),
    Case(
        "geoparquet_geocentric",
        "2D polygons in a GeoParquet declaring geocentric EPSG:4978",
        _geoparquet_crs("geocentric.parquet", "EPSG:4978"),
        "ingest",
        "is a Geocentric CRS (WGS 84), not a horizontal",
    ),
    Case(
        "shapefile_parts_mixed",
        "a .shp beside another delivery's .shx and .dbf (replaced part by part)",
        _shapefile("mixed", mutate=_parts_of_another),
        "ingest",
        "its .shp and .shx are not one shapefile",
    ),
]
