"""Where everything lives: the inbox, the warehouse, the reference layers. No geo imports.

Every path this project reads or writes comes from here, and every one is checked to
stay inside the data root: a partition key is a file name, never a path. The data root
itself (a folder, or an S3 prefix with this host's mirror of it) is dataroot.py's.
"""

import re
from pathlib import Path

from geoiso_dagster import dataroot, fsutil
from geoiso_dagster.errors import UnsafeNameError

_ASSET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_KEY_LENGTH = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Dagster refuses these inside partition keys; a comma would read as two keys in a CLI.
_RESERVED = (",", "[", "]", "...")


def data_root() -> Path:
    """The local folder every step reads and writes: the data root itself, or for an S3
    root this host's mirror of it."""
    return dataroot.root().local


def root_uri() -> str:
    """The data root as users name it: a folder's absolute path, or s3://bucket/prefix."""
    return dataroot.root().uri


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
    elif fsutil.TEMP_MARKER in key.lower():
        # another key's sweep would take this key's temps for its own (fsutil.temp_path_for)
        why = f"it contains {fsutil.TEMP_MARKER!r}, the mark of this project's temp names"
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


def output_path(
    asset: str, key: str, root: Path | None = None, *, suffix: str = ".parquet"
) -> Path:
    """<data root>/warehouse/<asset>/<key><suffix> (the suffix of the asset's output kind,
    defs/outputs.py)."""
    root = root or data_root()
    folder = warehouse_dir(root) / check_asset_name(asset)
    return _inside(root, folder / f"{check_partition_key(key)}{suffix}")


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
