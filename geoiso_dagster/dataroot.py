"""The data root: one object, built from GEOISO_DATA_ROOT, that answers every question the
run process asks of storage. No geo imports.

The root is a local folder (`LocalRoot`) or an S3 prefix (`BucketRoot`, `s3://bucket/
prefix`); anything else (another scheme, a malformed bucket) is refused, never taken as
a relative folder. Both answer the same questions, so the rest of the project asks them
without knowing which root it has:

- `local`: the folder the steps read and write (the root itself, or this host's mirror
  of a bucket: sources and upstream outputs are fetched into it, outputs are staged in
  it, uploaded, checked in the bucket and only then published there);
- `inbox()`: the inbox's entries (name, size, version, when it changed), and
  `read_small()` for a sidecar; the readiness rules (inbox.py) are written once over
  these;
- `reading()`: where the workers read a step's inputs (a path or a URI, in place or
  fetched), and `read_back()`: the staged output as the workers judge it;
- `publish()`, `discard()`, `sweep()`: a checked output made the truth, a failed
  attempt's output removed, dead writers' leftovers removed;
- `location()` and `shown()`: how users see a file (the catalog, `geoiso show`).

The worker side has one counterpart: spatial/io.py (with spatial/remote.py for objects)
is where a worker opens a source or an upstream output, a file or an object.
"""

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from geoiso_dagster import formats, fsutil, objectstore
from geoiso_dagster.errors import BadInputError, GeoisoError, TransientIOError
from geoiso_dagster.objectstore import S3Root

DATA_ROOT_ENV = "GEOISO_DATA_ROOT"
DEFAULT_DATA_ROOT = "./data"
SCRATCH_ENV = "GEOISO_SCRATCH_DIR"
# How inbox sources of an S3 root are read: "in-place" (range requests; the default) or
# "fetch" (whole, into this host's mirror first: for a store whose requests are slow).
SOURCES_ENV = "GEOISO_S3_SOURCES"
# A URI scheme ("s3:", "gs:", "https:"); one letter is a Windows drive, not a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens (AWS's rules).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_PART = re.compile(r"^[A-Za-z0-9!_.*'()@=+,-]+$")


class DataRootError(GeoisoError):
    """GEOISO_DATA_ROOT names a root this project cannot serve."""


@dataclass(frozen=True)
class Entry:
    """A file of the root as a listing sees it (the inbox's files and their parts)."""

    name: str
    size: int
    # What changes whenever its content may have: a file's mtime and ctime (ns), an
    # object's ETag.
    version: str
    changed: float  # seconds since the epoch: when it was written (or moved in)
    # Whether it can be read as a file: False for a folder, FIFO or device.
    regular: bool = True
    # Why it may never be read (a link out of the data root), or None.
    problem: str | None = None


@dataclass(frozen=True)
class Reading:
    """Where the workers read a step's inputs, as `reading()` chose it."""

    source: str
    inputs: dict[str, str]
    how: str  # "local file", "read in place", "fetch 3.1 MB", "mirror current"
    # The versions of an object source read in place by several requests: checked again
    # after the step (`check_unchanged`).
    versions: Mapping[str, str] | None = None


@dataclass(frozen=True)
class LocalRoot:
    """A folder data root: it is the truth and the working folder at once."""

    local: Path

    @property
    def uri(self) -> str:
        return str(self.local)

    def where(self, relative: str) -> str:
        return str(self.local / relative)

    def check(self) -> None:
        """Nothing to ask of a folder (it is made as files arrive)."""

    def inbox(self) -> dict[str, Entry]:
        """The inbox's entries by name: one listing and one lstat each (a link is
        followed once, if it stays inside the root)."""
        inbox = self.local / "inbox"
        try:
            with os.scandir(inbox) as listing:
                found = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        entries = {}
        for item in found:
            try:
                entries[item.name] = self._entry(item)
            except FileNotFoundError:
                continue  # moved away while we looked
        return entries

    def _entry(self, item: os.DirEntry) -> Entry:
        if item.is_symlink():
            target = Path(item.path).resolve()
            if not target.is_relative_to(self.local):
                return Entry(
                    item.name, 0, "", 0.0, False, f"is a link to {target}, outside the data root"
                )
            info = os.stat(target)
        else:
            info = item.stat(follow_symlinks=False)
        return Entry(
            item.name,
            info.st_size,
            f"{info.st_mtime_ns}:{info.st_ctime_ns}",
            max(info.st_mtime, info.st_ctime),  # moving a file in keeps its mtime
            stat.S_ISREG(info.st_mode),
        )

    def read_small(self, relative: str, limit: int) -> tuple[bytes, str]:
        """(the bytes of a small file, its name for errors): BadInputError for a FIFO or
        device, a link out of the root, a file over `limit` bytes."""
        path = self.local / relative
        return fsutil.read_small_regular_file(path, self.local, limit), str(path)

    def add(self, source: Path, parts: Iterable[Path], key: str) -> None:
        """Put `source` (with its `parts`) into the inbox as `key`: the parts first, the
        main file last, each atomically, so a watcher never sees a .shp whose .shx or
        .dbf has not arrived yet."""
        target = self.local / "inbox" / key
        if source.resolve() == target.resolve():
            return
        for part in parts:
            _copy_atomic(part, target.with_name(part.name))
        _copy_atomic(source, target)

    def shown(self, path: Path) -> str:
        return str(path)

    def location(self, path: Path) -> str:
        return path.as_uri()

    def size(self, source: str) -> int:
        return os.stat(source).st_size

    def parquet_metadata(self, source: str):
        import pyarrow.parquet as pq

        return pq.ParquetFile(source).metadata

    def reading(
        self, runner, source: Path, inputs: Mapping[str, Path], from_inbox: bool
    ) -> Reading:
        return Reading(str(source), {name: str(p) for name, p in inputs.items()}, "local file")

    def read_back(self, runner, staged: Path, task: str, **kwargs):
        """(the read-back `task`'s result on `staged`, what moving the staged file took:
        nothing here)."""
        return runner.run(task, path=str(staged), **kwargs), {}

    def check_unchanged(self, reading: Reading) -> None:
        """A local source is read by one process at a time from one file."""

    def transfers(
        self, asset_name: str, reading: Reading, times: Mapping[str, float]
    ) -> str | None:
        return None

    def endpoint(self) -> str | None:
        """The network endpoint the workers read this root over: none for a folder."""
        return None

    def transfer_folder(self, relative: str) -> Path | None:
        """The folder a transfer task keeps `relative`'s copy in: none for a folder."""
        return None

    def sweep(self, output: Path) -> None:
        fsutil.sweep_stale_temps(output)

    def discard(self, staged: Path) -> None:
        fsutil.remove_attempt(staged)

    def publish(self, staged: Path, output: Path) -> float:
        fsutil.publish(staged, output)
        return 0.0

    def stamp(self, output: Path, just_published: bool = False) -> str | None:
        """What tells this publication of `output` from any other (a rename gives a new
        inode): the catalog records it, so that it can be told whether it describes the
        file there now (defs/reconcile.py); None when there is no file."""
        try:
            info = output.stat()
        except FileNotFoundError:
            return None
        return f"file:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"

    def published_at(self, output: Path) -> float:
        """When `output` was last written (seconds since the epoch)."""
        return output.stat().st_mtime


@dataclass(frozen=True)
class BucketRoot:
    """An `s3://bucket/prefix` data root: the bucket holds the truth; this host works in
    a private mirror of the part of it a step touches."""

    s3: S3Root
    local: Path = field(compare=False)

    @property
    def uri(self) -> str:
        return self.s3.uri

    def where(self, relative: str) -> str:
        return self.s3.uri_of(relative)

    def _relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.local).as_posix()

    def check(self) -> None:
        """StorageAccessError (or TransientIOError) unless the bucket answers: refused
        where a setting is made (`geoiso add`), naming the bucket, not in a run."""
        objectstore.check_bucket(self.s3)

    def inbox(self) -> dict[str, Entry]:
        """One listing of `inbox/` (1,000 keys a request). An object is whole once it is
        listed; its version is its ETag, so a re-upload is a new version."""
        return {
            info.key.rpartition("/")[2]: Entry(
                info.key.rpartition("/")[2], info.size, info.etag, info.modified
            )
            for info in objectstore.list_objects(self.s3, "inbox")
        }

    def read_small(self, relative: str, limit: int) -> tuple[bytes, str]:
        return objectstore.read_small(self.s3, self.s3.key(relative), limit), self.where(relative)

    def add(self, source: Path, parts: Iterable[Path], key: str) -> None:
        """Upload `source` and its `parts` to `inbox/`: the parts first, the main object
        last, so that a sensor listing the bucket never sees a .shp before its .shx."""
        for part in parts:
            objectstore.upload(self.s3, part, self.s3.key(f"inbox/{part.name}"))
        objectstore.upload(self.s3, source, self.s3.key(f"inbox/{key}"))

    def shown(self, path: Path) -> str:
        """The output's URI, once the mirror holds its published version (fetched unless
        it does); a path the bucket does not have is removed from the mirror."""
        relative = self._relative(path)
        key = self.s3.key(relative)
        try:
            info = objectstore.head(self.s3, key)
        except BadInputError:  # no such object
            path.unlink(missing_ok=True)
            return self.where(relative)
        with objectstore.mirror_lock(path):
            if not objectstore.mirror_holds(path, info):
                objectstore.etag_file(path).unlink(missing_ok=True)
                objectstore.download(self.s3, key, path, expect_etag=info.etag)
                objectstore.remember(path, info.etag)
        return self.where(relative)

    def location(self, path: Path) -> str:
        return self.where(self._relative(path))

    def size(self, source: str) -> int:
        if not source.startswith("s3://"):  # an upstream output the mirror holds
            return LocalRoot(self.local).size(source)
        return objectstore.head(self.s3, objectstore.split_uri(source)[1]).size

    def parquet_metadata(self, source: str):
        if not source.startswith("s3://"):  # an upstream output the mirror holds
            return LocalRoot(self.local).parquet_metadata(source)
        return objectstore.parquet_file(self.s3, source).metadata

    def reading(
        self, runner, source: Path, inputs: Mapping[str, Path], from_inbox: bool
    ) -> Reading:
        """An inbox source is read in place (GDAL's /vsis3/ or Arrow, by range requests),
        except a zip archive or a name GDAL cannot be given safely, which a worker fetches
        whole with its parts into the mirror; an upstream output is read from the mirror
        when it holds the published version (the step before ran here), else in place."""
        relative = self._relative(source)
        others = {name: self._upstream(path) for name, path in inputs.items()}
        if from_inbox and self.in_place(self.where(relative)):
            versions = objectstore.versions(self.s3, relative)
            return Reading(self.where(relative), others, "read in place", versions)
        if from_inbox:
            fetched = runner.run("fetch", relative=relative, source=True).facts["fetched_bytes"]
            return Reading(str(source), others, f"fetch {_mb(fetched)}")
        where = self._upstream(source)
        return Reading(
            where, others, "read in place" if where.startswith("s3://") else "mirror current"
        )

    @staticmethod
    def in_place(uri: str) -> bool:
        """Whether the workers read inbox object `uri` where it is, rather than a fetched
        copy: sources are read in place (GEOISO_S3_SOURCES), it is not a zip (unpacked
        from a local file) or a GeoPackage (whose CRS table SQLite reads from a file before
        GDAL opens it, spatial/declared.py; SQLite over range requests also pays a request
        a page), and its name can be given to GDAL safely."""
        how = os.environ.get(SOURCES_ENV) or "in-place"
        if how not in ("in-place", "fetch"):
            raise BadInputError(f"{SOURCES_ENV}={how!r}", "must be 'in-place' or 'fetch'")
        if how == "fetch" or uri.lower().endswith((*formats.ARCHIVE_SUFFIXES, ".gpkg")):
            return False
        return objectstore.gdal_readable(uri)

    def _upstream(self, local: Path) -> str:
        """The mirror's copy when it holds the published version (same ETag), else the
        object in place (BadInputError when it was never published)."""
        relative = self._relative(local)
        info = objectstore.head(self.s3, self.s3.key(relative))
        with objectstore.mirror_lock(local):
            if objectstore.mirror_holds(local, info):
                return str(local)
        return self.where(relative)

    def read_back(self, runner, staged: Path, task: str, **kwargs):
        """The staged file uploaded to its staged key and read back from the bucket (by
        the read-back `task`, on the object downloaded again): the object judged is the
        object that will be published."""
        relative = self._relative(staged)
        clock = time.monotonic()
        uploaded = runner.run("upload", path=str(staged), relative=relative).facts
        moved = {"upload_bytes": uploaded["bytes"], "upload_s": time.monotonic() - clock}
        return runner.run("inspect_object", relative=relative, read_back=task, **kwargs), moved

    def check_unchanged(self, reading: Reading) -> None:
        """An object read in place by several requests (and workers) was read from one
        version, or the step runs again on the new one (transient)."""
        if reading.versions is None:
            return
        relative = self.s3.relative(objectstore.split_uri(reading.source)[1])
        if objectstore.versions(self.s3, relative) != reading.versions:
            raise TransientIOError(f"{reading.source}: changed while it was being read; read again")

    def transfers(
        self, asset_name: str, reading: Reading, times: Mapping[str, float]
    ) -> str | None:
        return (
            f"{asset_name}: S3 transfers: input ({reading.how}) in {times['input']:.1f} s, "
            f"work {times['work']:.1f} s, upload {_mb(times['upload_bytes'])} in "
            f"{times['upload_s']:.1f} s, read back and checked in {times['read_back']:.1f} s"
        )

    def endpoint(self) -> str | None:
        """The S3 endpoint's URL (AWS's own when none is set): the one place a confined
        task may connect to (pool/sandbox.py)."""
        how = objectstore.connection()
        if not how.netloc:
            return "https://s3.amazonaws.com"
        return f"{'https' if how.https else 'http'}://{how.netloc}"

    def transfer_folder(self, relative: str) -> Path | None:
        """The mirror's folder of `relative` (fetch, upload, read back keep copies there),
        made; None for a name out of the mirror."""
        folder = (self.local / relative).parent
        if not folder.resolve().is_relative_to(self.local.resolve()):
            return None
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def sweep(self, output: Path) -> None:
        """Local temps, and the staged objects and open multipart uploads of dead writers."""
        fsutil.sweep_stale_temps(output)
        objectstore.sweep_staged(self.s3, self.s3.key(self._relative(output)))

    def discard(self, staged: Path) -> None:
        """The staged object too (uploaded only while the local file exists: publishing
        moves both). With the bucket away, the next writer's sweep removes the pair."""
        if staged.exists():
            try:
                objectstore.discard_staged(self.s3, self.s3.key(self._relative(staged)))
            except GeoisoError:
                fsutil.remove_attempt(staged, keep_staged=True)
                return
        fsutil.remove_attempt(staged)

    def publish(self, staged: Path, output: Path) -> float:
        """The staged object becomes the published key (the truth), then the mirror keeps
        the file for the steps after this one on this host; returns the seconds taken."""
        clock = time.monotonic()
        key = self.s3.key(self._relative(output))
        objectstore.publish(self.s3, self.s3.key(self._relative(staged)), key)
        etag = objectstore.head(self.s3, key).etag
        with objectstore.mirror_lock(output):
            objectstore.etag_file(output).unlink(missing_ok=True)
            fsutil.publish(staged, output)
            objectstore.remember(output, etag)
        return time.monotonic() - clock

    def stamp(self, output: Path, just_published: bool = False) -> str | None:
        """The published object's ETag (the bucket is the truth; the mirror's record of it
        right after this host published it); None when there is none."""
        if just_published:
            with contextlib.suppress(OSError):
                return "etag:" + objectstore.etag_file(output).read_text()
        try:
            return "etag:" + objectstore.head(self.s3, self.s3.key(self._relative(output))).etag
        except BadInputError:
            return None

    def published_at(self, output: Path) -> float:
        """When the published object was last written (seconds since the epoch)."""
        return objectstore.head(self.s3, self.s3.key(self._relative(output))).modified


Root = LocalRoot | BucketRoot


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _copy_atomic(source: Path, target: Path) -> None:
    try:
        with fsutil.atomic_path(target) as tmp:
            shutil.copy2(source, tmp)
    except OSError as exc:  # the inbox refusing (unwritable, full): named, one line
        raise fsutil.storage_error(target, exc, "copying into the inbox") from None


def root() -> Root:
    """The data root of this process, from $GEOISO_DATA_ROOT (default ./data); a bucket
    root's mirror folder is checked each time (see `mirror_dir`)."""
    return parse_root(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def parse_root(text: str) -> Root:
    """A LocalRoot (the folder made absolute) or a BucketRoot; DataRootError otherwise."""
    s3 = parse_bucket(text)
    return LocalRoot(Path(text).resolve()) if s3 is None else BucketRoot(s3, mirror_dir(s3))


def parse_bucket(text: str) -> S3Root | None:
    """The S3Root `text` names, None for a folder; DataRootError for anything else."""
    match = _SCHEME.match(text)
    if "://" not in text and not text.lower().startswith("s3:"):
        return None  # a folder (its name may hold a ':', as in "data:2025")
    scheme = match.group(1).lower() if match else ""
    if scheme != "s3":
        raise DataRootError(
            f"{DATA_ROOT_ENV}={text[:200]!r}: scheme {scheme or '(none)'!r} is not supported; "
            "use a local folder or s3://bucket/prefix"
        )
    if not text.startswith(("s3://", "S3://")):
        raise DataRootError(f"{DATA_ROOT_ENV}={text[:200]!r} is not of the form s3://bucket/prefix")
    bucket, _, prefix = text[5:].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise DataRootError(
            f"{DATA_ROOT_ENV}={text[:200]!r}: {bucket[:80]!r} is not an S3 bucket name "
            "(3-63 lower-case letters, digits, '.' and '-')"
        )
    prefix = prefix.removesuffix("/")
    parts = prefix.split("/") if prefix else []
    if any(p in (".", "..") or not _PREFIX_PART.match(p) for p in parts) or len(prefix) > 512:
        raise DataRootError(
            f"{DATA_ROOT_ENV}={text[:200]!r}: the prefix must be '/'-separated names of "
            "letters, digits and !_.*'()@=+,- (no empty, '.' or '..' parts)"
        )
    return S3Root(bucket, prefix)


def check_setting() -> None:
    """DataRootError unless GEOISO_DATA_ROOT names a root this project can serve (a
    folder, or s3://bucket/prefix); nothing is made or asked yet."""
    bucket()


def bucket() -> S3Root | None:
    """The S3 root of this process, or None for a folder root (without making a mirror)."""
    return parse_bucket(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def mirror_dir(root: S3Root) -> Path:
    """This host's local working copy of an S3 root: $GEOISO_SCRATCH_DIR/<bucket>-<hash
    of the root> (default: geoiso-scratch-<uid> in the system temp folder). Nothing in it
    is the truth; it is safe to delete between runs.

    Workers trust what the mirror holds, so its folder must be this user's alone: a
    folder someone else made (a link planted in /tmp, a group- or world-writable one)
    could feed the workers files of their choosing. It is made 0700, and refused when it
    is a link, belongs to another user or others may write it."""
    default = Path(tempfile.gettempdir()) / f"geoiso-scratch-{os.geteuid()}"
    base = Path(os.environ.get(SCRATCH_ENV) or default)
    digest = hashlib.sha256(root.uri.encode()).hexdigest()[:12]
    mirror = base / f"{root.bucket[:40]}-{digest}"
    for folder in (base, mirror):
        _private_folder(folder)
    return mirror.resolve()


def _private_folder(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        raise DataRootError(f"{SCRATCH_ENV} folder {folder}: {exc.strerror or exc}") from None
    why = None
    if stat.S_ISLNK(info.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        why = "is not a folder"
    elif info.st_uid != os.geteuid():
        why = f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    elif info.st_mode & 0o022:
        why = f"may be written by others (mode {stat.S_IMODE(info.st_mode):o})"
    if why:
        raise DataRootError(
            f"the mirror folder {folder} {why}; workers would trust files others put there. "
            f"Remove it, or set {SCRATCH_ENV} to a folder of your own"
        )
