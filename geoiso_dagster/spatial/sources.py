"""The source jail: what a source file may make a worker open, checked before GDAL sees it.

A source is untrusted. Four rules, each an allow-list:

1. Formats. The file's suffix names its format, and the driver GDAL detects must be that
   format's (`FORMATS`); every other GDAL driver is unregistered in the workers (see
   gdal_jail.py), so a VRT, a GML with xlinks, a WFS URL or a `.shz` never opens.
   None of the allowed formats can reference another file or a URL.
2. Files. Every file the format may open (the source, a shapefile's parts, SQLite's
   `-wal`/`-shm`/`-journal`) must be a regular file that resolves inside the data root;
   a directory, a FIFO or a link out of the root refuses the source. A local source is
   judged as opened and read as judged (`pin`): no name is looked up twice.
   With an S3 root, a source may be an object read in place: the same rules hold for
   objects, and GDAL reaches the network for that source's objects only
   (spatial/remote.py).
3. Archives. A `.zip` is never opened by GDAL (its `/vsizip/` would skip the checks
   made on real files): it is unpacked here, member by member, into a private folder
   beside the output, with limits, and the one dataset inside is checked like any other.
4. Declarations. The content is the format its suffix names (its first bytes), and every
   CRS it declares obeys the target_crs grammar, read from the source's own bytes before
   GDAL or PROJ parses any of it (spatial/declared.py).
"""

import contextlib
import os
import shutil
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from geoiso_dagster import formats, paths
from geoiso_dagster.errors import BadInputError, TransientIOError
from geoiso_dagster.fsutil import temp_path_for
from geoiso_dagster.spatial import declared, io, remote

FORMATS = formats.GDAL_FORMATS
PARQUET_SUFFIXES = formats.PARQUET_SUFFIXES
ARCHIVE_SUFFIXES = formats.ARCHIVE_SUFFIXES
ALLOWED_DRIVERS = formats.ALLOWED_GDAL_DRIVERS
ALLOWED_SUFFIXES = formats.SOURCE_SUFFIXES
# Archive limits: what a delivered zip legitimately holds, and no zip bomb.
MAX_ARCHIVE_MEMBERS = 200
MAX_UNPACKED_BYTES = 8 * 2**30
MAX_COMPRESSION_RATIO = 200


def suffix_of(path: "Path | str") -> str:
    """The lower-case suffix of a path or an object's URI."""
    return PurePosixPath(str(path)).suffix.lower()


def check_format(path: "Path | str", what: str | None = None) -> str:
    """The format's suffix, or BadInputError naming the allow-list."""
    suffix = suffix_of(path)
    if suffix not in ALLOWED_SUFFIXES:
        raise BadInputError(
            what or str(path),
            f"format {suffix or '(no suffix)'!r} is not on the allow-list "
            f"{sorted(ALLOWED_SUFFIXES)}; convert it first (ogr2ogr -f GPKG)",
        )
    return suffix


def companions(path: Path) -> list[Path]:
    """Every file beside `path` that its format may open, as named on disk (exact stem)."""
    names = sorted(set(formats.companion_names(path.name)))
    return [path.parent / n for n in names if os.path.lexists(path.parent / n)]


def check_inside(path: Path, root: Path, what: str) -> None:
    """`path` is a regular file (after links) that resolves inside `root`."""
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise BadInputError(what, f"{path.name} does not exist (or is a dangling link)") from None
    except (OSError, RuntimeError) as exc:  # a link loop
        raise BadInputError(what, f"{path.name} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root):
        where = f"is a link to {resolved}," if path.is_symlink() else "lies"
        raise BadInputError(what, f"{path.name} {where} outside the data root {root}")
    mode = resolved.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (FIFO, device...)"
        raise BadInputError(what, f"{path.name} is {kind}; a source is one regular file")


def jail_root() -> Path:
    """The data root of this worker (the pool puts GEOISO_DATA_ROOT in its environment)."""
    return paths.data_root().resolve()


def check_source_files(source: "Path | str") -> list[str]:
    """Rules 1 to 3 for `source` and each file its format may open; returns the CRS
    names a GeoJSON declares (declared.check)."""
    what = str(source)
    suffix = check_format(source, what)
    if io.is_uri(source):
        remote.inspect(source)
    else:
        root = jail_root()
        check_inside(source, root, what)
        for part in companions(source):
            check_inside(part, root, what)
        if suffix == ".gpkg":
            _check_no_pending_wal(source)
    if suffix in ARCHIVE_SUFFIXES:
        return []  # its dataset is checked once unpacked
    return declared.check(declared_bytes(source), suffix)


def declared_bytes(source: "Path | str") -> "declared.FileBytes | declared.ObjectBytes":
    """How spatial/declared.py reads what `source` declares: a file, or an object."""
    return (
        declared.ObjectBytes(str(source)) if io.is_uri(source) else declared.FileBytes(Path(source))
    )


def fgb_features(source: "Path | str") -> int:
    """The features a FlatGeobuf stores, checked against its header (declared.py)."""
    return declared.check_fgb_features(declared_bytes(source))


def check_gpkg_layer(source: "Path | str", layer: str | None) -> None:
    """The GeoPackage layer to read is a table whose blobs are in its CRS (declared.py)."""
    with declared_bytes(source).as_file() as path:
        declared.check_gpkg_layer(str(source), path, layer)


def geojson_crs_names(source: "Path | str") -> list[str]:
    """The CRS names GeoJSON `source` declares, as the jail found them (declared.py)."""
    return declared.geojson_names(declared_bytes(source))


def _check_no_pending_wal(gpkg: Path) -> None:
    """A GeoPackage whose SQLite log holds changes is refused, with the fix
    (formats.pending_wal)."""
    if size := formats.pending_wal_beside(gpkg):
        raise BadInputError(str(gpkg), formats.wal_refusal(gpkg.name, size))


def check_driver(source: Path, driver: str | None) -> None:
    """The driver GDAL detected is the one the suffix names (checks are per format)."""
    expected = FORMATS.get(suffix_of(source))
    if driver != expected:
        raise BadInputError(
            str(source),
            f"is named {suffix_of(source)} but its content is {driver or 'unknown'} data; "
            f"rename it to its real format (allowed: {sorted(ALLOWED_DRIVERS)})",
        )


def source_access(source: "Path | str") -> contextlib.AbstractContextManager:
    """While a checked `source` is read: for an object, its checked version known and
    GDAL's network opened for its objects only (spatial/remote.py); nothing for a file."""
    return remote.gdal_access(source) if io.is_uri(source) else contextlib.nullcontext()


@contextlib.contextmanager
def opened(
    source: "Path | str", scratch_beside: Path, identity: list | None = None
) -> Iterator[tuple["Path | str", str]]:
    """(the file to read, how to name it in errors). A local source is read as pinned
    (`pinned`): its files opened once, what was opened checked, and hard-linked into a
    private folder beside `scratch_beside` (inside the data root) removed afterwards;
    every check and GDAL read the pinned files, so a name swapped for a link after the
    check reaches nothing, and an error about the pinned file names the source.
    `identity` (the survey's) must be the pinned source's, or the file changed between
    the parts of one fan-out (transient). A `.zip` is unpacked into that folder and its
    one dataset read. An object of an S3 root is read in place, GDAL allowed its objects
    meanwhile; a zip object (which the steps fetch whole) is downloaded first."""
    if io.is_uri(source):
        check_source_files(source)
        if suffix_of(source) not in ARCHIVE_SUFFIXES:
            with source_access(source):
                yield source, str(source)
            return
        with _private_folder(scratch_beside) as folder:
            archive = folder / remote.name_of(source)
            with open(archive, "wb") as out:
                for chunk in remote.read(source):
                    out.write(chunk)
            yield _unpacked(archive, str(source)), str(source)
        return
    with pinned(source, scratch_beside) as (path, pinned_as):
        if identity is not None and list(pinned_as) != list(identity):
            raise TransientIOError(
                f"{source}: changed while it was being read (between the survey and this "
                "part); read again"
            )
        check_source_files(path)
        if suffix_of(source) not in ARCHIVE_SUFFIXES:
            yield path, str(source)
        else:
            yield _unpacked(Path(path), str(source)), str(source)


def _unpacked(archive: Path, what: str) -> Path:
    """The one dataset of `archive`, unpacked beside it and checked (rule 4); the archive
    itself removed."""
    folder = archive.parent / ".unpacked"
    folder.mkdir()
    inner = unpack(archive, folder, what)
    try:
        declared.check(declared.FileBytes(inner), suffix_of(inner))
    except BadInputError as exc:
        raise BadInputError(what, f"(member {inner.name}) {exc.cause}") from None
    archive.unlink(missing_ok=True)
    return inner


@contextlib.contextmanager
def _private_folder(scratch_beside: Path) -> Iterator[Path]:
    folder = temp_path_for(scratch_beside)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def pinned(
    source: "Path | str", scratch_beside: Path
) -> Iterator[tuple["Path | str", tuple | None]]:
    """(the source as pinned beside `scratch_beside`, its identity) for the time of the
    block, errors about the pinned file naming the source; an object of an S3 root as it
    is (its version is checked by the data root), identity None."""
    if io.is_uri(source):
        yield source, None
        return
    with _private_folder(scratch_beside) as folder:
        path, identity = pin(Path(source), folder)
        with named_as(path, str(source)):
            yield path, identity


def pin(source: Path, folder: Path) -> tuple[Path, tuple[int, int, int, int]]:
    """Open `source` and each file its format may open beside it once, check what was
    opened (a regular file whose real path, as the kernel tells it for the descriptor,
    lies inside the data root), and hard-link exactly that file into `folder` under its
    own name (a copy when the folder is on another file system, or the kernel refuses
    the link). Returns the pinned source and its identity (device, inode, size, mtime)."""
    root, what = jail_root(), str(source)
    identity = None
    for part in [source, *companions(source)]:
        try:
            fd = os.open(part, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BadInputError(
                what, f"{part.name} does not exist (or is a dangling link)"
            ) from None
        except OSError as exc:
            raise BadInputError(what, f"{part.name} cannot be opened: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not real.is_relative_to(root):
                raise BadInputError(
                    what, f"{part.name} is a link to {real}, outside the data root {root}"
                )
            if not stat.S_ISREG(info.st_mode):
                kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
                raise BadInputError(what, f"{part.name} is {kind}; a source is one regular file")
            _link_or_copy(fd, folder / part.name)
        finally:
            os.close(fd)
        if part == source:
            identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    assert identity is not None
    return folder / source.name, identity


def _link_or_copy(fd: int, target: Path) -> None:
    try:
        os.link(f"/proc/self/fd/{fd}", target, follow_symlinks=True)
    except OSError:  # another file system (EXDEV), or protected_hardlinks (EPERM)
        with os.fdopen(os.dup(fd), "rb") as src, open(target, "xb") as out:
            shutil.copyfileobj(src, out, 2**20)


@contextlib.contextmanager
def named_as(pinned: "Path | str", what: str) -> Iterator[None]:
    """A BadInputError about the pinned file names the source it stands for."""
    try:
        yield
    except BadInputError as exc:
        if exc.path != str(pinned):
            raise
        raise BadInputError(what, exc.cause.replace(str(pinned), what)) from None


def unpack(archive: Path, folder: Path, what: str | None = None) -> Path:
    """Unpack the members of `archive` into `folder` (flat: only base names, no links,
    bounded in count and size, the real bytes counted) and return its one dataset; errors
    name `what` (default: the archive)."""
    what = what or str(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            _check_members(what, archive, members)
            written = 0
            for member in members:
                target = folder / _member_name(what, member)
                if target.exists():
                    raise BadInputError(what, f"holds {target.name} twice")
                with zf.open(member) as src, open(target, "xb") as out:
                    while chunk := src.read(2**20):
                        written += len(chunk)
                        if written > MAX_UNPACKED_BYTES:
                            raise BadInputError(
                                what, f"unpacks to more than {MAX_UNPACKED_BYTES} bytes"
                            )
                        out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise BadInputError(what, f"is not a readable zip archive: {exc}") from None
    except zipfile.error as exc:  # pragma: no cover - zipfile's other errors
        raise BadInputError(what, f"is not a readable zip archive: {exc}") from None
    datasets = [
        p
        for p in sorted(folder.iterdir())
        if suffix_of(p) in (*FORMATS, *PARQUET_SUFFIXES) and suffix_of(p) != ".json"
    ]
    if len(datasets) != 1:
        names = [p.name for p in datasets] or sorted(p.name for p in folder.iterdir())
        raise BadInputError(
            what,
            f"must hold exactly one dataset (.shp with its parts, .gpkg, .geojson, .fgb or "
            f"GeoParquet); it holds {names}",
        )
    return datasets[0]


def _member_name(what: str, member: zipfile.ZipInfo) -> str:
    name = member.filename.replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name in (".", "..") or name.startswith(".") or "\x00" in name:
        raise BadInputError(what, f"holds a member with an unusable name: {member.filename!r}")
    return name


def _check_members(what: str, archive: Path, members: list[zipfile.ZipInfo]) -> None:
    if not members:
        raise BadInputError(what, "is an empty zip archive")
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise BadInputError(
            what, f"holds {len(members)} files; at most {MAX_ARCHIVE_MEMBERS} are unpacked"
        )
    for member in members:
        mode = member.external_attr >> 16
        if mode and not (stat.S_ISREG(mode) or mode & 0o170000 == 0):
            raise BadInputError(
                what, f"member {member.filename!r} is a link or special file; only files"
            )
        if member.flag_bits & 0x1:
            raise BadInputError(what, f"member {member.filename!r} is encrypted")
    declared = sum(m.file_size for m in members)
    size = max(1, archive.stat().st_size)
    # Small archives may compress very well (a .dbf of blanks); the ratio matters at scale.
    bomb = declared > 2**27 and declared / size > MAX_COMPRESSION_RATIO
    if declared > MAX_UNPACKED_BYTES or bomb:
        raise BadInputError(
            what,
            f"declares {declared} unpacked bytes from {size} (ratio limit "
            f"{MAX_COMPRESSION_RATIO}, size limit {MAX_UNPACKED_BYTES}): refused as a zip bomb",
        )
