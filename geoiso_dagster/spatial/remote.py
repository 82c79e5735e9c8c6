"""Sources read in place from an S3 data root: GDAL formats through /vsis3/, GeoParquet
through Arrow (spatial/io.py), with the rules of the source jail (spatial/sources.py)
applied to objects.

1. Formats: by suffix, as for files.
2. Files: the object and every part its format may open beside it (exact stem, as the
   bucket lists them) are objects of the data root; a key outside its prefix is refused.
   An object is always one regular file: there is no link, folder or FIFO to refuse. A
   GeoPackage whose `-wal` object holds changes is refused, as locally.
3. Network: GDAL's network access stays closed in workers (pool/env.py) except while a
   checked source is read (`gdal_access`): then GDAL may open exactly that source's
   objects, by whole /vsis3/ name, with the credentials boto3 resolved set as GDAL
   options (never in the environment). Afterwards the options are put back and GDAL's
   cache of the objects is dropped (a later task may read a newer version).

GDAL's errors while reading an object are reported by kind (access denied, transient,
gone) and never with the server's text, which may echo an access key id.
"""

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyogrio

from geoiso_dagster import dataroot, formats, gdal_jail, objectstore
from geoiso_dagster.errors import (
    BadInputError,
    GeoisoError,
    StorageAccessError,
    TransientIOError,
)


@dataclass(frozen=True)
class SourceObject:
    """A source object as checked: its URI, and what was listed of it and of each part
    its format opens beside it, by URI (the source's own entry included)."""

    uri: str
    objects: dict[str, objectstore.ObjectInfo]


# The sources being read by this worker's task, by URI (set by `gdal_access`).
_open: dict[str, SourceObject] = {}


def s3_root() -> objectstore.S3Root:
    """This worker's S3 data root (GeoisoError when it has a folder root)."""
    root = dataroot.bucket()
    if root is None:
        raise GeoisoError("this worker's data root is not an s3:// root")
    return root


def name_of(uri: str) -> str:
    return uri.rpartition("/")[2]


def inspect(uri: str) -> SourceObject:
    """Rules 1 and 2 for object `uri` (BadInputError or UnsafeNameError otherwise)."""
    if uri in _open:
        return _open[uri]
    root = s3_root()
    objectstore.in_root(root, uri)
    key = objectstore.split_uri(uri)[1]
    relative = root.relative(key)
    main = objectstore.head(root, key)  # names a missing source as such
    listed = objectstore.source_objects(root, relative)
    check_no_pending_wal(uri, listed)
    objects = {f"s3://{root.bucket}/{info.key}": info for info in listed.values()}
    return SourceObject(uri, {**objects, uri: main})


def check_no_pending_wal(uri: str, listed: dict[str, objectstore.ObjectInfo]) -> None:
    """A GeoPackage object whose `-wal` object (in `listed`, by name) holds changes is
    refused, as a local one is (formats.pending_wal)."""
    name = name_of(uri)
    if size := formats.pending_wal(name, {n: info.size for n, info in listed.items()}):
        raise BadInputError(uri, formats.wal_refusal(name, size))


def part_uri(uri: str, suffix: str) -> str | None:
    """A shapefile part as GDAL finds it (exact stem; suffix as written or upper case)."""
    source = inspect(uri)
    folder, _, name = uri.rpartition("/")
    for part in formats.part_names(name.rpartition(".")[0], suffix):
        if f"{folder}/{part}" in source.objects:
            return f"{folder}/{part}"
    return None


def _known(uri: str) -> objectstore.ObjectInfo | None:
    """What was listed of `uri` when the source it belongs to was checked, if it is
    being read now."""
    for source in _open.values():
        if uri in source.objects:
            return source.objects[uri]
    return None


def size(uri: str) -> int:
    known = _known(uri)
    if known is not None:
        return known.size
    return objectstore.head(s3_root(), objectstore.split_uri(uri)[1]).size


def version(uri: str) -> str | None:
    """The ETag of a source object (or part) being read now, as checked; else None."""
    known = _known(uri)
    return known.etag if known is not None else None


def read(uri: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """The bytes of a source object or part, in chunks, as they were when checked."""
    root = s3_root()
    key = objectstore.split_uri(uri)[1]
    etag = version(uri) or objectstore.head(root, key).etag
    yield from objectstore.read_chunks(root, key, etag, start, length)


def read_bytes(uri: str, start: int = 0, length: int | None = None) -> bytes:
    return b"".join(read(uri, start, length))


@contextlib.contextmanager
def gdal_access(uri: str) -> Iterator[SourceObject]:
    """Rule 3: while inside, GDAL may open the checked source `uri` and its parts, and
    nothing else on the network."""
    if uri in _open:  # already being read, by the caller
        yield _open[uri]
        return
    source = inspect(uri)
    allowed = [uri, *sorted(set(source.objects) - {uri})]
    before = gdal_jail.config_options()
    _open[uri] = source
    try:
        pyogrio.set_gdal_config_options(objectstore.gdal_config(allowed))
        yield source
    finally:
        _open.pop(uri, None)
        gdal_jail.restore_config_options(before)
        gdal_jail.clear_network_cache()


def gdal_name(uri: str) -> str:
    """The name GDAL opens object `uri` by."""
    return "/vsis3/" + uri.removeprefix("s3://")


# How GDAL reports an HTTP status: as its error, or in the warnings it gives on the way.
_HTTP_CODE = re.compile(
    r"HTTP (?:response|error) code:\s*(\d{3})|HTTP response code on \S+: (\d{3})",
    re.IGNORECASE,
)
_UNREACHABLE = (
    "curl error",
    "couldn't connect",
    "could not connect",
    "connection refused",
    "timed out",
    "timeout was reached",
    "connection reset",
    "recv failure",
    "send failure",
    "empty reply",
)
_DENIED = ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "expiredtoken")


def gdal_error(
    uri: str, exc: BaseException, doing: str, warnings: list[str] = ()
) -> GeoisoError | None:
    """The project's error for a GDAL error raised while object `uri` was read, when it
    came from the network (None: the data's own error, for the caller to name). GDAL's
    error may be only the server's message; the status is then in its `warnings`."""
    text = "\n".join([str(exc), *warnings])
    lower = text.lower()
    codes = [int(a or b) for a, b in _HTTP_CODE.findall(text)]
    status = max(codes) if codes else None
    bucket = objectstore.split_uri(uri)[0]
    if status == 403 or any(word in lower for word in _DENIED):
        return StorageAccessError(
            f"{uri}: access denied by the bucket {bucket!r} while {doing}; check the "
            "credentials and the bucket policy"
        )
    if status == 404 or status == 412:
        return BadInputError(uri, f"changed or was deleted while {doing}; deliver it again")
    if (status is not None and (status >= 500 or status == 429)) or any(
        word in lower for word in _UNREACHABLE
    ):
        what = f"HTTP {status}" if status else "the connection failed"
        return TransientIOError(f"{uri}: S3 read failed ({what}) while {doing}")
    if "does not exist in the file system" in lower:
        # The bucket listed it a moment ago: it went away, or GDAL could not reach it.
        return TransientIOError(f"{uri}: GDAL could not open the object while {doing}")
    if status is not None:
        return BadInputError(uri, f"cannot be read (HTTP {status}) while {doing}")
    return None


def scrub(text: str, uri: str) -> str:
    """GDAL's text about object `uri`, naming it by its URI and holding no credential."""
    text = text.replace(gdal_name(uri), uri)
    how = objectstore.connection()
    for secret in (how.access_key, how.secret_key, how.token):
        if secret:
            text = text.replace(secret, "***")
    return text
