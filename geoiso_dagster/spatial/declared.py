"""What a source declares, read from its own bytes before GDAL or PROJ reads any of it.

GDAL parses a source's CRS when it opens the source, and hands it to PROJ, which opens
whatever files the definition names (an init file, a grid by path) and, for a GeoJSON
`crs` member of type `link`, GDAL fetches the URL first. So the checks below run on the
raw declarations, in the jail (spatial/sources.py), before the first GDAL call:

1. Content. The file is the format its suffix names, by its first bytes (a GeoJSON named
   `.fgb` would otherwise be opened by GDAL's GeoJSON driver, link and all).
2. CRS. Every CRS definition the source carries passes the grammar of `target_crs`
   (settings.check_crs): a shapefile's `.prj`, each definition in a GeoPackage's
   `gpkg_spatial_ref_sys`, a FlatGeobuf header's CRS, every GeoJSON `crs` member (at any
   depth: GDAL reads a geometry's own), and a GeoParquet's `geo` CRS (spatial/io.py).
   A GeoJSON's members are judged on the parsed JSON (escaped keys, keys in any case as
   GDAL matches them, duplicates): each must be `{"type": "name", "properties": {"name":
   ...}}`, all the same; a `link` (a URL or file) is refused whatever it carries.

Libraries: ijson (a streaming JSON parser, yajl in C) so that a GeoJSON of any size is
parsed in bounded memory; the FlatBuffers runtime to read a FlatGeobuf header; Python's
sqlite3, read-only and immutable, with a deadline, for a GeoPackage's table.
"""

import codecs
import contextlib
import io as _io
import re
import sqlite3
import struct
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import flatbuffers
import ijson
from flatbuffers.table import Table

from geoiso_dagster import formats
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.settings import MAX_SETTING_LENGTH, check_crs
from geoiso_dagster.spatial import remote

GEOJSON_SUFFIXES = (".geojson", ".json", ".geojsonl", ".geojsons")
FGB_MAGIC = b"fgb\x03fgb"  # then one byte: the patch version
SQLITE_MAGIC = b"SQLite format 3\x00"
SHAPEFILE_CODE = 9994  # the first four bytes of a .shp, big-endian
GPKG_DEADLINE_S = 5.0  # reading gpkg_spatial_ref_sys (a view over an endless query stops)
MAX_FGB_HEADER = 16 * 2**20
# A key of the text "crs" in any case, each letter literal or \u-escaped: a file without
# one has no crs member, so most files are never parsed (a regex scans ~1 GB/s).
_CRS_STRING = re.compile(
    rb'"(?:[cC]|\\u00(?:63|43))(?:[rR]|\\u00(?:72|52))(?:[sS]|\\u00(?:73|53))"'
)
_SCAN_CHUNK = 2**20
_ORGANIZATION = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def check(data: "FileBytes | ObjectBytes", suffix: str) -> list[str]:
    """Rules 1 and 2 for `source` (a file, or an object of an S3 root) read as `suffix`;
    returns the CRS names a GeoJSON's members declare ([] for other formats), for the
    check after GDAL read it."""
    what = data.what
    head = data.read(0, 64)
    check_content(what, suffix, head)
    if suffix == ".shp":
        for name, raw in data.parts(".prj"):
            check_prj(what, name, raw)
        for name, raw in data.parts(".cpg"):
            check_cpg(what, name, raw)
    elif suffix == ".gpkg":
        with data.as_file() as path:
            check_gpkg(what, path)
    elif suffix == ".fgb":
        size = int.from_bytes(head[8:12], "little")  # after the magic check_content judged
        check_fgb_header(what, data.read(0, 12 + min(size, MAX_FGB_HEADER)))
    elif suffix in GEOJSON_SUFFIXES:
        names = geojson_crs_names(what, data.stream)
        _geojson_seen[what] = (data.identity(), names)
        return names
    return []


# What `check` found of this task's GeoJSON sources, by name, with the file's identity,
# so that the check after GDAL's read does not parse the file a second time.
_geojson_seen: dict[str, tuple[object, list[str]]] = {}


def geojson_names(data: "FileBytes | ObjectBytes") -> list[str]:
    """The CRS names GeoJSON `source` declares: as `check` found them if the file is
    unchanged since, else read again (and checked again)."""
    seen = _geojson_seen.get(data.what)
    if seen is not None and seen[0] == data.identity():
        return seen[1]
    return check(data, ".geojson")


class FileBytes:
    """A source on a local disk, as `check` reads it (sources.declared_bytes picks)."""

    def __init__(self, path: Path):
        self.path, self.what = path, str(path)

    def identity(self) -> object:
        stat = self.path.stat()
        return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def read(self, start: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(length)

    def stream(self) -> BinaryIO:
        return open(self.path, "rb")

    def parts(self, part: str) -> list[tuple[str, bytes]]:
        stem = self.path.name[: -len(self.path.suffix)]
        found = [self.path.parent / n for n in formats.part_names(stem, part)]
        return [(p.name, FileBytes(p).read(0, MAX_SETTING_LENGTH + 1)) for p in found if p.exists()]

    @contextlib.contextmanager
    def as_file(self) -> Iterator[Path]:
        yield self.path


class ObjectBytes:
    """An object of an S3 root, read as checked (spatial/remote.py)."""

    def __init__(self, uri: str):
        self.uri = self.what = uri

    def identity(self) -> object:
        return remote.version(self.uri)

    def read(self, start: int, length: int) -> bytes:
        return remote.read_bytes(
            self.uri, start, min(length, max(0, remote.size(self.uri) - start))
        )

    def stream(self) -> BinaryIO:
        return _io.BufferedReader(_Chunks(remote.read(self.uri)), _SCAN_CHUNK)

    def parts(self, part: str) -> list[tuple[str, bytes]]:
        uri = remote.part_uri(self.uri, part)
        return (
            []
            if uri is None
            else [(remote.name_of(uri), ObjectBytes(uri).read(0, MAX_SETTING_LENGTH + 1))]
        )

    @contextlib.contextmanager
    def as_file(self) -> Iterator[Path]:
        """A private copy (SQLite reads files): the steps fetch GeoPackage objects whole
        (dataroot.in_place), so this is only for a task of one's own given the URI."""
        with tempfile.TemporaryDirectory(prefix="geoiso-declared-") as folder:
            copy = Path(folder) / remote.name_of(self.uri)
            with open(copy, "wb") as out:
                for chunk in remote.read(self.uri):
                    out.write(chunk)
            yield copy


class _Chunks(_io.RawIOBase):
    """A stream of an iterator's byte chunks."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.pending = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            self.pending = next(self.chunks, b"")
            if not self.pending:
                return 0
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


def check_content(what: str, suffix: str, head: bytes) -> None:
    """The first bytes are those of the format `suffix` names."""
    name = formats.GDAL_FORMATS.get(suffix, suffix)
    if suffix == ".fgb":
        ok = head[:7] == FGB_MAGIC
    elif suffix == ".gpkg":
        ok = head[:16] == SQLITE_MAGIC
    elif suffix == ".shp":
        ok = len(head) >= 4 and int.from_bytes(head[:4], "big") == SHAPEFILE_CODE
    elif suffix in GEOJSON_SUFFIXES:
        text = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n\x1e")
        ok = text[:1] == b"{" or (not text and len(head) < 64)  # blank: GDAL says empty
    else:
        return
    if not ok and head:
        raise BadInputError(
            what,
            f"is named {suffix} but its content is not {name} data (it starts with "
            f"{head[:16]!r}); rename it to its real format",
        )


def check_prj(what: str, name: str, raw: bytes) -> None:
    """A shapefile's .prj: WKT (or an authority code) under the target_crs rules."""
    text = _decode(raw).strip()
    if text:
        check_crs(text, what, f"the CRS its {name} declares")


def check_cpg(what: str, name: str, raw: bytes) -> str:
    """A shapefile's .cpg names an ASCII-compatible encoding (UTF-8, ISO-8859-n, a code
    page, Big5, ...), read as GDAL reads it; returns Python's name for it. UTF-16 and
    UTF-32 (or UTF-7) would turn every attribute byte into other text; an encoding no one
    knows is not guessed."""
    value = _decode(raw).strip()
    upper = value.upper()
    if re.fullmatch(r"LDID/\d{1,3}", upper):
        return "ldid"  # a dBASE language driver: GDAL maps it to one of its code pages
    codec = _CPG_NAMES.get(upper.replace("-", "").replace("_", ""))
    if codec is None:
        if upper.startswith("8859"):
            codec = "iso8859-" + upper[4:].lstrip("-_")
        elif upper.startswith("ANSI "):
            codec = "cp" + upper[5:].strip()
        elif upper.isdigit():
            codec = "cp" + upper
        else:
            codec = value
    try:
        known = codecs.lookup(codec).name if len(value) <= 40 else None
    except LookupError:
        known = None
    ascii_bytes = _ASCII_PROBE.encode("ascii")
    if (
        known is None
        or ascii_bytes.decode(known, "replace") != _ASCII_PROBE
        or _ASCII_PROBE.encode(known) != ascii_bytes
    ):
        raise BadInputError(
            what,
            f"its {name} names the encoding {value[:40]!r}, which is not an ASCII-compatible "
            "one Python's codecs know (UTF-8, ISO-8859-1, CP1252, Big5, ...); write the "
            ".cpg for the .dbf's real encoding",
        )
    return known


_CPG_NAMES = {"UTF8": "utf-8", "65001": "utf-8"}
_ASCII_PROBE = "region_id +-/.,:0123456789 AZaz"


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def check_gpkg(what: str, path: Path) -> None:
    """Every definition in a GeoPackage's gpkg_spatial_ref_sys (both WKT columns of the
    crs_wkt extension) and its organization, read by SQLite read-only and immutable (the
    jail refused a pending -wal), within GPKG_DEADLINE_S."""
    deadline = time.monotonic() + GPKG_DEADLINE_S
    connection = _open_gpkg(what, path)
    try:
        connection.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        connection.execute("PRAGMA trusted_schema = OFF")
        cursor = connection.execute("SELECT * FROM gpkg_spatial_ref_sys LIMIT 100000")
        columns = [c[0].lower() for c in cursor.description]
        for row in cursor:
            _check_srs_row(what, dict(zip(columns, row, strict=True)))
    except sqlite3.OperationalError as exc:
        if time.monotonic() > deadline:
            raise BadInputError(
                what, f"its gpkg_spatial_ref_sys did not read within {GPKG_DEADLINE_S:.0f} s"
            ) from None
        if "no such table" in str(exc):
            return  # not a GeoPackage's layout: GDAL refuses it, naming why
        raise BadInputError(what, f"cannot be read as a GeoPackage (SQLite: {exc})") from None
    except sqlite3.Error as exc:
        raise BadInputError(what, f"cannot be read as a GeoPackage (SQLite: {exc})") from None
    finally:
        connection.close()


def check_gpkg_layer(what: str, path: Path, layer: str | None) -> None:
    """The feature table to read is a table (not a view, which may never end, nor a
    virtual table), and each geometry blob's srs_id is its layer's: GDAL reads every
    blob in the layer's CRS whatever the blob says, so a blob of another would be
    published in the wrong place, green. One scan of the geometry column, by SQLite,
    read-only; run once per file (the survey, or the one task that reads it whole)."""
    connection = _open_gpkg(what, path)
    try:
        connection.execute("PRAGMA trusted_schema = OFF")
        layers = connection.execute(
            "SELECT c.table_name, g.column_name, g.srs_id, m.type, m.sql "
            "FROM gpkg_contents c JOIN gpkg_geometry_columns g "
            "ON lower(g.table_name) = lower(c.table_name) "
            "LEFT JOIN sqlite_master m ON lower(m.name) = lower(c.table_name) "
            "WHERE c.data_type = 'features'"
        ).fetchall()
        for table, column, srs_id, kind, sql in layers:
            if layer is not None and str(table) != layer:
                continue
            if kind != "table" or str(sql or "").lstrip().upper().startswith("CREATE VIRTUAL"):
                found = "virtual table" if kind == "table" else kind or "missing table"
                raise BadInputError(
                    what,
                    f"its layer {table!r} is a {found}, not a table; geoiso reads only tables "
                    "(a view may compute without end)",
                )
            _check_blob_srs(what, connection, str(table), str(column), int(srs_id))
    except sqlite3.Error as exc:
        if "no such table" in str(exc):
            return  # not a GeoPackage's layout: GDAL refuses it, naming why
        raise BadInputError(what, f"cannot be read as a GeoPackage (SQLite: {exc})") from None
    finally:
        connection.close()


def _check_blob_srs(what: str, connection, table: str, column: str, srs_id: int) -> None:
    table_q, column_q = (f'"{n.replace(chr(34), chr(34) * 2)}"' for n in (table, column))
    little, big = (srs_id.to_bytes(4, order, signed=True).hex() for order in ("little", "big"))
    # a blob is 'GP', version, flags (bit 0: little-endian), then the srs_id
    differs = (
        f"{column_q} IS NOT NULL AND length({column_q}) >= 8 AND substr({column_q}, 5, 4) != "
        f"CASE WHEN instr('13579BDF', substr(hex(substr({column_q}, 4, 1)), 2, 1)) > 0 "
        f"THEN X'{little}' ELSE X'{big}' END"
    )
    (count,) = connection.execute(f"SELECT count(*) FROM {table_q} WHERE {differs}").fetchone()
    if count:
        (blob,) = connection.execute(
            f"SELECT substr({column_q}, 1, 8) FROM {table_q} WHERE {differs} LIMIT 1"
        ).fetchone()
        order = "little" if blob[3] & 1 else "big"
        found = int.from_bytes(blob[4:8], order, signed=True)
        raise BadInputError(
            what,
            f"{count} geometries of layer {table!r} declare srs_id {found} while the layer "
            f"declares {srs_id}; GDAL would read them in the layer's CRS; refused",
        )


def _open_gpkg(what: str, path: Path) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1"
    try:
        return sqlite3.connect(uri, uri=True, timeout=0)
    except sqlite3.Error as exc:
        raise BadInputError(what, f"cannot be read as a GeoPackage (SQLite: {exc})") from None


def _check_srs_row(what: str, row: dict) -> None:
    label = f"the CRS its gpkg_spatial_ref_sys declares (srs_id {row.get('srs_id')!r})"
    organization = row.get("organization")
    if organization not in (None, "") and not (
        isinstance(organization, str) and _ORGANIZATION.match(organization)
    ):
        raise BadInputError(
            what, f"{label} names the organization {str(organization)[:40]!r}, not a name"
        )
    for column in ("definition", "definition_12_063"):
        value = row.get(column)
        if isinstance(value, bytes):
            value = _decode(value)
        if value is None or not str(value).strip() or str(value).strip() == "undefined":
            continue
        check_crs(str(value), what, label)


def check_fgb_header(what: str, data: bytes) -> dict:
    """A FlatGeobuf header's CRS (org:code, code_string, WKT) under the target_crs rules,
    and its columns' names unique; returns what it declares (features, columns)."""
    if len(data) < 12:
        raise BadInputError(what, "is too short to be FlatGeobuf")
    size = int.from_bytes(data[8:12], "little")
    if size < 4 or size > MAX_FGB_HEADER or 12 + size > len(data):
        raise BadInputError(what, f"declares a FlatGeobuf header of {size} bytes; refused")
    buf = bytearray(data[12 : 12 + size])
    try:
        header = _root(buf)
        facts = {
            "features": _scalar(header, 8, flatbuffers.number_types.Uint64Flags, 0),
            "index_node_size": _scalar(header, 9, flatbuffers.number_types.Uint16Flags, 16),
            "header_bytes": 12 + size,
        }
        count = _length(header, 7)
        if count > size // 4:
            raise ValueError(f"{count} columns in a header of {size} bytes")
        facts["columns"] = names = [
            _string(_table(buf, header, 7, i), 0) or "" for i in range(count)
        ]
        crs = _table(buf, header, 10)
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise BadInputError(what, f"has a FlatGeobuf header that cannot be read: {exc}") from None
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadInputError(what, f"declares the column {duplicates[0]!r} twice")
    if crs is not None:
        label = "the CRS its FlatGeobuf header declares"
        organization = _string(crs, 0)
        code = _scalar(crs, 1, flatbuffers.number_types.Int32Flags, 0)
        if organization and not _ORGANIZATION.match(organization):
            raise BadInputError(
                what, f"{label} names the organization {organization[:40]!r}, not a name"
            )
        for value in (_string(crs, 4), _string(crs, 5)):  # wkt, code_string
            if value and value.strip():
                check_crs(value, what, label)
        if organization and code:
            check_crs(f"{organization}:{code}", what, label)
    return facts


def check_fgb_features(data: "FileBytes | ObjectBytes") -> int:
    """The features a FlatGeobuf stores are the ones its header declares. GDAL reads as
    many as the header says and stops: a header declaring 5 of 177 would publish 5, green.
    So its features are walked (each is a uint32 length and that many bytes, after the
    header and the spatial index the declared count sizes) to the file's last byte, in
    one sequential read; returns the count (0 in the header: not declared, GDAL reads to
    the end). Run once per file (the survey, or the one task that reads it whole)."""
    what = data.what
    head = data.read(0, 12)
    size = int.from_bytes(head[8:12], "little") if len(head) == 12 else 0
    facts = check_fgb_header(what, data.read(0, 12 + min(size, MAX_FGB_HEADER)))
    declared, node_size = facts["features"], facts["index_node_size"]
    start = facts["header_bytes"] + (_rtree_bytes(declared, node_size) if node_size else 0)
    with data.stream() as stream:
        stored, end, total = _walk_features(stream, start)
    if end != total:
        where = (
            f"runs past its end ({total} bytes)"
            if end > total
            else f"leaves {total - end} bytes at its end that are not a whole feature"
        )
        declares = f" (its header declares {declared})" if declared else ""
        raise BadInputError(
            what,
            f"is not whole FlatGeobuf: after {stored} features{declares} the data {where}; "
            "it is truncated or its header lies; refused",
        )
    if declared and stored != declared:
        raise BadInputError(
            what,
            f"its FlatGeobuf header declares {declared} features but {stored} are stored "
            "(GDAL would read only the declared ones); refused, write the file again",
        )
    return stored


def _rtree_bytes(features: int, node_size: int) -> int:
    """The size of a FlatGeobuf's packed Hilbert R-tree over `features` items (40-byte
    nodes, every level down to one root), as the format's own calcTreeSize."""
    if features == 0:
        return 0
    node_size = min(max(node_size, 2), 65535)
    n = nodes = features
    while n != 1:
        n = -(-n // node_size)
        nodes += n
    return nodes * 40


def _walk_features(stream: BinaryIO, start: int) -> tuple[int, int, int]:
    """Walk length-prefixed records from byte `start` of `stream` to its end: (records
    whole, where the walk ended, the stream's size)."""
    length = struct.Struct("<I").unpack_from
    stored, pos, base, pending = 0, start, 0, b""
    while chunk := stream.read(_SCAN_CHUNK):
        pending += chunk
        limit = base + len(pending) - 4
        while pos <= limit:
            pos += 4 + length(pending, pos - base)[0]
            stored += 1
        drop = min(pos - base, len(pending))
        pending, base = pending[drop:], base + drop
    total = base + len(pending)
    if pos > total and stored:  # the last one runs past the end
        stored -= 1
    return stored, pos, total


def _root(buf: bytearray) -> Table:
    return Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))


def _field(table: Table, index: int) -> int:
    return table.Offset(4 + 2 * index)


def _scalar(table: Table, index: int, flags, default):
    offset = _field(table, index)
    return table.Get(flags, table.Pos + offset) if offset else default


def _string(table: Table, index: int) -> str | None:
    offset = _field(table, index)
    return table.String(table.Pos + offset).decode("utf-8") if offset else None


def _length(table: Table, index: int) -> int:
    offset = _field(table, index)
    return table.VectorLen(offset) if offset else 0


def _table(buf: bytearray, table: Table, index: int, item: int | None = None) -> Table | None:
    offset = _field(table, index)
    if not offset:
        return None
    if item is None:
        return Table(buf, table.Indirect(table.Pos + offset))
    position = table.Vector(offset) + 4 * item
    return Table(buf, table.Indirect(position))


def geojson_crs_names(what: str, open_stream: Callable[[], BinaryIO]) -> list[str]:
    """The CRS names of every `crs` member of a GeoJSON (or GeoJSON sequence) `stream`,
    each judged on the parsed JSON; BadInputError for a member that is not a named CRS
    under the target_crs rules, or for two that differ."""
    with open_stream() as stream:
        if not _mentions_crs(stream):
            return []
    names = []
    with open_stream() as stream:
        try:
            for member in _crs_members(_Unseparated(stream)):
                names.append(_named_crs(what, member))
        except ijson.JSONError as exc:
            raise BadInputError(what, f"is not valid JSON: {str(exc)[:200]}") from None
    if len(set(names)) > 1:
        raise BadInputError(what, f"declares {len(set(names))} different CRS: {sorted(set(names))}")
    return names


def _mentions_crs(stream) -> bool:
    """Whether the text holds the string "crs" (any case, any escapes), scanned in chunks
    that overlap by the longest form."""
    chunk, tail = stream.read(_SCAN_CHUNK), b""
    while chunk:
        if _CRS_STRING.search(tail + chunk):
            return True
        tail = (tail + chunk)[-24:]
        chunk = stream.read(_SCAN_CHUNK)
    return False


class _Unseparated:
    """A GeoJSON text sequence's record separators (RS, RFC 8142) read as spaces."""

    def __init__(self, stream):
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size).replace(b"\x1e", b" ")


def _crs_members(stream) -> Iterator[object]:
    """The value of every object member whose key is "crs" (ASCII, any case: GDAL's
    match), at any depth, as (key, value) pairs lists for objects."""
    events = ijson.basic_parse(stream, multiple_values=True, use_float=True)
    for event, value in events:
        if event == "map_key" and value.isascii() and value.lower() == "crs":
            yield _value(events)


def _value(events: Iterator[tuple[str, object]]) -> object:
    event, value = next(events)
    return _build(event, value, events)


def _build(event: str, value: object, events) -> object:
    if event == "start_map":
        pairs = []
        for event, value in events:
            if event == "end_map":
                return pairs
            pairs.append((value, _value(events)))  # event is map_key
    if event == "start_array":
        items = []
        for event, value in events:
            if event == "end_array":
                return items
            items.append(_build(event, value, events))
    return value


def _member(pairs: object, key: str, what: str) -> object:
    """The value of `key` (ASCII, any case) in an object given as pairs; refused if the
    object holds it twice (which one a reader takes is the reader's choice)."""
    if not isinstance(pairs, list) or any(not isinstance(p, tuple) for p in pairs):
        return None
    found = [v for k, v in pairs if k.isascii() and k.lower() == key]
    if len(found) > 1:
        raise BadInputError(what, f"has a crs member that holds {key!r} twice")
    return found[0] if found else None


def _named_crs(what: str, member: object) -> str:
    kind = _member(member, "type", what)
    if not isinstance(kind, str) or kind.lower() != "name":
        shown = kind if isinstance(kind, str) else type(kind).__name__
        raise BadInputError(
            what,
            f"declares its CRS with a 'crs' member of type {str(shown)[:40]!r}; only a named "
            "CRS ({'type': 'name', ...}) is read: a link would make GDAL open a file or URL, "
            "and anything else is read as WGS 84 without a word",
        )
    properties = _member(member, "properties", what)
    name = _member(properties, "name", what)
    if not isinstance(name, str):
        raise BadInputError(what, "has a named 'crs' member without a name")
    check_crs(name, what, "the CRS its crs member declares")
    return name
