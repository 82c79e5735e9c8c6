"""What a source declares is judged before GDAL or PROJ reads it (spatial/declared.py), in
real workers: a CRS naming an outside file is refused in every format before PROJ opens
the file (a FIFO outside the data root tells whether anyone opened it), and no byte of a
GeoJSON makes a request (a server on 127.0.0.1 counts them)."""

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import geopandas
import pyarrow.parquet as pq
import pyogrio
import pyproj
import pytest
from shapely.geometry import box

from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.pool import PoolSettings, WorkerPool
from geoiso_dagster.spatial import declared
from tests.test_jail import _CountingServer

_SERVE_FIFO = """
import os, sys
path = sys.argv[1]
while True:
    os.close(os.open(path, os.O_WRONLY))  # returns once a reader opens the FIFO
    if os.path.exists(path + ".stop"):
        break
    with open(path + ".opens", "a") as log:
        log.write("opened\\n")
"""


class _Fifo:
    """A FIFO outside the data root, and a process that answers every open of it (so no
    reader stays blocked) and counts them: `opens`, read once the process has stopped
    (it logs an open just after answering it, so a count read while it runs could miss
    the last one)."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self.writer = subprocess.Popen([sys.executable, "-c", _SERVE_FIFO, str(path)])

    @property
    def opens(self) -> int:
        self.close()
        log = self.path.with_name(self.path.name + ".opens")
        return len(log.read_text().splitlines()) if log.exists() else 0

    def close(self) -> None:
        if self.writer.poll() is not None:
            return
        self.path.with_name(self.path.name + ".stop").touch()
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # the writer's last open
        try:
            self.writer.wait(10)
        finally:
            os.close(fd)
            self.writer.kill()
            self.writer.wait()


@pytest.fixture
def fifo(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    pipe = _Fifo(outside / "grid.gsb")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def server():
    counting = _CountingServer()
    yield counting
    counting.close()


@pytest.fixture
def pool(data_root):
    with WorkerPool(PoolSettings(task_module=TASK_MODULE, max_workers=1)) as pool:
        yield pool


FRAME = geopandas.GeoDataFrame(
    {"region_id": [1, 2]}, geometry=[box(0, 0, 1, 1), box(1, 0, 2, 1)], crs="EPSG:4326"
)


def _wkt_with_grid(grid: Path) -> str:
    return (
        'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
        'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433],'
        f'EXTENSION["PROJ4","+proj=longlat +ellps=WGS84 +nadgrids={grid} +no_defs"]]'
    )


def _ingest_refused(pool, source: Path, cause: str) -> None:
    output = source.parent.parent / "warehouse" / f"{source.name}.parquet"
    with pytest.raises(BadInputError) as info:
        pool.run("ingest", source=str(source), output=str(output))
    assert info.value.path == str(source), "the failure names the source"
    assert cause in info.value.cause, info.value.cause
    assert "Internal error" not in str(info.value)
    assert not output.exists()


def test_proj_opens_a_file_a_crs_names_and_the_test_can_tell(fifo):
    with pytest.raises(pyproj.exceptions.CRSError):
        pyproj.CRS(f"+init={fifo.path}:1")
    assert fifo.opens, "PROJ did not open the init file: this test could not tell"


def test_a_shapefile_prj_naming_a_grid_by_path_is_refused_before_proj_sees_it(
    data_root, pool, fifo
):
    shp = data_root / "inbox" / "grid.shp"
    FRAME.to_file(shp)
    shp.with_suffix(".prj").write_text(_wkt_with_grid(fifo.path))
    _ingest_refused(pool, shp, "the CRS its grid.prj declares")
    assert fifo.opens == 0


def test_a_geopackage_srs_naming_a_grid_is_refused(data_root, pool, fifo):
    gpkg = data_root / "inbox" / "grid.gpkg"
    FRAME.to_file(gpkg)
    with sqlite3.connect(gpkg) as connection:
        connection.execute(
            "UPDATE gpkg_spatial_ref_sys SET definition = ? WHERE srs_id = 4326",
            (_wkt_with_grid(fifo.path),),
        )
    _ingest_refused(pool, gpkg, "the CRS its gpkg_spatial_ref_sys declares (srs_id 4326)")
    assert fifo.opens == 0


def test_a_flatgeobuf_header_naming_a_grid_is_refused(data_root, pool, fifo):
    fgb = data_root / "inbox" / "grid.fgb"
    FRAME.to_file(fgb, SPATIAL_INDEX="NO")
    data = fgb.read_bytes()
    # The header's WKT (a FlatBuffers string: its length in the 4 bytes before it),
    # replaced by one as long.
    start = max(data.find(b'GEOGCRS["WGS 84"'), data.find(b'GEOGCS["WGS 84"'))
    length = int.from_bytes(data[start - 4 : start], "little")
    hostile = _wkt_with_grid(fifo.path).encode()
    assert start > 0 and len(hostile) <= length
    fgb.write_bytes(data[:start] + hostile.ljust(length) + data[start + length :])
    _ingest_refused(pool, fgb, "the CRS its FlatGeobuf header declares")
    assert fifo.opens == 0


@pytest.mark.parametrize(
    "crs",
    ["+init={grid}:1", {"$schema": "x", "type": "BoundCRS", "parameter_file": "{grid}"}],
    ids=["init_string", "projjson_bound_crs"],
)
def test_a_geoparquet_geo_crs_naming_a_file_is_refused(data_root, pool, fifo, crs):
    path = data_root / "inbox" / "grid.parquet"
    FRAME.to_parquet(path)
    table = pq.read_table(path)
    geo = json.loads(table.schema.metadata[b"geo"])
    geo["columns"]["geometry"]["crs"] = json.loads(
        json.dumps(crs).replace("{grid}", str(fifo.path))
    )
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo)}), path)
    _ingest_refused(pool, path, "the CRS its geo metadata declares")
    assert fifo.opens == 0


def test_a_geojson_named_crs_with_an_init_file_is_refused(data_root, pool, fifo):
    path = data_root / "inbox" / "init.geojson"
    doc = json.loads(FRAME.to_json())
    doc["crs"] = {"type": "name", "properties": {"name": f"+init={fifo.path}:1"}}
    path.write_text(json.dumps(doc))
    _ingest_refused(pool, path, "names a file path")
    assert fifo.opens == 0


def _linked(server, where: str = "root", decoy: bool = False) -> dict:
    doc = json.loads(FRAME.to_json())
    link = {"type": "link", "properties": {"href": f"{server.url}/crs.wkt", "type": "wkt"}}
    if decoy:
        link["properties"]["crs"] = {"type": "name", "properties": {"name": "EPSG:4326"}}
    if where == "root":
        doc["crs"] = link
    else:  # GDAL reads a geometry's own crs member too
        doc["crs"] = {"type": "name", "properties": {"name": "EPSG:4326"}}
        doc["features"][1]["geometry"]["CRS"] = link
    return doc


def test_a_geojson_link_crs_is_refused_with_no_request_in_any_disguise(data_root, pool, server):
    inbox = data_root / "inbox"
    plain = json.dumps(_linked(server))
    disguises = {
        "link.geojson": plain,
        "escaped.geojson": plain.replace('"crs"', '"cr\\u0073"'),
        "decoy.geojson": json.dumps(_linked(server, decoy=True)),
        "geometry.geojson": json.dumps(_linked(server, where="geometry")),
        "link.geojsonl": "\n".join(
            json.dumps({**feature, "crs": _linked(server)["crs"]})
            for feature in _linked(server)["features"]
        ),
    }
    for name, text in disguises.items():
        (inbox / name).write_text(text)
        _ingest_refused(pool, inbox / name, "of type 'link'")
    renamed = inbox / "link.fgb"
    renamed.write_text(plain)
    _ingest_refused(pool, renamed, "is named .fgb but its content is not FlatGeobuf data")
    assert server.hits == []
    # The test can tell: GDAL itself, outside the jail, fetches the link of the escaped
    # one (in this test's process, with every driver and the network).
    with contextlib.suppress(Exception):
        pyogrio.read_info(inbox / "escaped.geojson")
    assert server.hits, "GDAL did not fetch the link: this test could not tell"


def test_geojson_crs_members_are_judged_on_the_parsed_json(tmp_path):
    def names(text: str) -> list[str]:
        path = tmp_path / "x.geojson"
        path.write_text(text)
        return declared.check(declared.FileBytes(path), ".geojson")

    named = {"type": "name", "properties": {"name": "EPSG:3035"}}
    doc = {"type": "FeatureCollection", "features": []}
    assert names(json.dumps(doc)) == []
    assert names(json.dumps({**doc, "description": 'a "crs": {"type": "link"}'})) == []
    assert names(json.dumps({**doc, "CRS": named})) == ["EPSG:3035"]
    # The same name in a geometry's member: one CRS.
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "crs": named}}
    assert names(json.dumps({**doc, "crs": named, "features": [feature]})) == ["EPSG:3035"] * 2
    refusals = {
        "different CRS": {**doc, "crs": named, "features": [{**feature, "geometry": {"crs": {
            "type": "name", "properties": {"name": "EPSG:4326"}}}}]},
        "holds 'type' twice": {**doc, "crs": {"type": "name", "TYPE": "link"}},
        "of type 'NoneType'": {**doc, "crs": None},
        "without a name": {**doc, "crs": {"type": "name", "properties": {"href": "x"}}},
    }  # fmt: skip
    for cause, document in refusals.items():
        with pytest.raises(BadInputError, match=cause.replace("(", r"\(")):
            names(json.dumps(document))


def test_aux_files_beside_a_geopackage_are_never_opened(data_root, pool, fifo, tmp_path):
    """GDAL's PAM opens <name>.aux (and <stem>.aux) beside a GeoPackage, a link out of the
    root alike: the workers turn PAM off, and read the source as pinned (its own files
    only). GDAL outside the jail does open such a FIFO, so the test can tell."""
    other = _Fifo(tmp_path / "outside" / "other.aux")
    try:
        for name, pipe in (("aux", fifo), ("plain", other)):
            gpkg = data_root / "inbox" / f"{name}.gpkg"
            FRAME.to_file(gpkg)
            for companion in (f"{name}.gpkg.aux", f"{name}.aux", f"{name}.gpkg.aux.xml"):
                (gpkg.parent / companion).symlink_to(pipe.path)
        output = data_root / "warehouse" / "aux.parquet"
        source = data_root / "inbox" / "aux.gpkg"
        assert pool.run("ingest", source=str(source), output=str(output)).facts["rows"] == 2
        assert fifo.opens == 0
        outside = subprocess.run(
            [sys.executable, "-c", "import pyogrio, sys; pyogrio.read_info(sys.argv[1])"]
            + [str(data_root / "inbox" / "plain.gpkg")],
            timeout=60,
        )
        assert outside.returncode == 0
        assert other.opens > 0, "GDAL did not open the .aux: this test could not tell"
    finally:
        other.close()
