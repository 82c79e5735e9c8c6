"""Where everything lives: the data root, the inbox, the warehouse. No geo imports.

Every path this project reads or writes comes from here, and every one is checked to
stay inside the data root: a partition key is a file name, never a path.

The data root is a local folder or an S3 prefix (`s3://bucket/prefix`); anything else
(another scheme, a malformed bucket) is refused, never taken as a relative folder. With
an S3 root the bucket holds the truth, and each host works in a local mirror of the
part of it a step touches (`data_root()`, under GEOISO_SCRATCH_DIR): sources and
upstream outputs are fetched into it, outputs are staged in it, uploaded, checked in
the bucket and only then published there (see objectstore.py and defs/envelope.py).
"""

import hashlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from geoiso_dagster.errors import GeoisoError, UnsafeNameError

DATA_ROOT_ENV = "GEOISO_DATA_ROOT"
DEFAULT_DATA_ROOT = "./data"
SCRATCH_ENV = "GEOISO_SCRATCH_DIR"
# A URI scheme ("s3:", "gs:", "https:"); one letter is a Windows drive, not a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens (AWS's rules).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_PART = re.compile(r"^[A-Za-z0-9!_.*'()@=+,-]+$")
ASSET_NAMES = ("raw_features", "reprojected_features", "dissolved_regions")
_ASSET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_KEY_LENGTH = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Dagster refuses these inside partition keys; a comma would read as two keys in a CLI.
_RESERVED = (",", "[", "]", "...")


class DataRootError(GeoisoError):
    """GEOISO_DATA_ROOT names a root this project cannot serve."""


@dataclass(frozen=True)
class S3Root:
    """An `s3://bucket/prefix` data root: keys below `prefix/` are the root's files."""

    bucket: str
    prefix: str  # without a leading or trailing '/'; '' for the bucket's top

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, relative: str) -> str:
        """The object key of `relative` (a path below the root, '/'-separated)."""
        parts = relative.split("/")
        if not relative or any(p in ("", ".", "..") for p in parts):
            raise UnsafeNameError(relative, f"is not a path inside the data root {self.uri}")
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def relative(self, key: str) -> str:
        """The path below the root of object `key`; UnsafeNameError for a key outside it."""
        head = f"{self.prefix}/" if self.prefix else ""
        rest = key[len(head) :] if key.startswith(head) else None
        if not rest or any(p in ("", ".", "..") for p in rest.split("/")):
            raise UnsafeNameError(key, f"lies outside the data root {self.uri}")
        return rest

    def uri_of(self, relative: str) -> str:
        return f"s3://{self.bucket}/{self.key(relative)}"


def parse_root(text: str) -> Path | S3Root:
    """A local folder (made absolute) or an S3Root; DataRootError for anything else."""
    match = _SCHEME.match(text)
    if "://" not in text and not text.lower().startswith("s3:"):
        return Path(text).resolve()  # a folder (its name may hold a ':', as in "data:2025")
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


def configured_root() -> Path | S3Root:
    """The data root as configured: $GEOISO_DATA_ROOT, or ./data."""
    return parse_root(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def remote_root() -> S3Root | None:
    """The S3 root, or None when the data root is a local folder."""
    root = configured_root()
    return root if isinstance(root, S3Root) else None


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


def data_root() -> Path:
    """The local folder every step reads and writes: the data root itself, or for an S3
    root this host's mirror of it."""
    root = configured_root()
    return mirror_dir(root) if isinstance(root, S3Root) else root


def root_uri() -> str:
    """The data root as users name it: a folder's absolute path, or s3://bucket/prefix."""
    root = configured_root()
    return root.uri if isinstance(root, S3Root) else str(root)


def relative_to_root(path: Path, root: Path | None = None) -> str:
    """`path` (inside the local root or mirror) as a '/'-separated path below it."""
    return path.resolve().relative_to((root or data_root()).resolve()).as_posix()


def inbox_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "inbox"


def warehouse_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "warehouse"


def check_partition_key(key: str) -> str:
    """Return `key` if it is a safe file name, else raise UnsafeNameError saying why."""
    why = None
    if not key or not key.strip():
        why = "it is empty"
    elif "/" in key or "\\" in key:
        why = "it contains a path separator"
    elif ".." in key:
        why = "it contains '..'"
    elif key.startswith("."):
        why = "it starts with '.' (hidden and temporary files are never partitions)"
    elif _CONTROL.search(key):
        why = "it contains a control character"
    elif any(bad in key for bad in _RESERVED):
        why = "it contains one of , [ ] or ..."
    elif len(key) > MAX_KEY_LENGTH:
        why = f"it is longer than {MAX_KEY_LENGTH} characters"
    elif key != key.strip():
        why = "it starts or ends with white space"
    if why:
        raise UnsafeNameError(repr(key), f"not usable as a partition key: {why}")
    return key


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafeNameError(str(path), f"resolves outside the data root {root}")
    return path


def source_path(key: str, root: Path | None = None) -> Path:
    """The inbox file that partition `key` is made from."""
    root = root or data_root()
    return _inside(root, inbox_dir(root) / check_partition_key(key))


def output_path(asset: str, key: str, root: Path | None = None) -> Path:
    """<data root>/warehouse/<asset>/<key>.parquet"""
    root = root or data_root()
    folder = warehouse_dir(root) / check_asset_name(asset)
    return _inside(root, folder / f"{check_partition_key(key)}.parquet")


def check_asset_name(name: str) -> str:
    """`name` when it can name an asset and its warehouse folder (Dagster's rule for asset
    names: letters, digits, underscores); ValueError if not."""
    if not isinstance(name, str) or not _ASSET_NAME.fullmatch(name):
        raise ValueError(f"bad asset name {name!r}: letters, digits and '_' only")
    return name


def reference_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "reference"


def reference_path(name: str, root: Path | None = None) -> Path:
    """<data root>/reference/<name>: a layer every partition may read (a boundary, a
    flood-zone map), by a safe file name, never a path."""
    root = root or data_root()
    return _inside(root, reference_dir(root) / check_partition_key(name))
