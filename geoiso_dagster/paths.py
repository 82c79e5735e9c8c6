"""Where everything lives: the data root, the inbox, the warehouse. No geo imports.

Every path this project reads or writes comes from here, and every one is checked to
stay inside the data root: a partition key is a file name, never a path.
"""

import os
import re
from pathlib import Path

from geoiso_dagster.errors import UnsafeNameError

DATA_ROOT_ENV = "GEOISO_DATA_ROOT"
DEFAULT_DATA_ROOT = "./data"
ASSET_NAMES = ("raw_features", "reprojected_features", "dissolved_regions")
MAX_KEY_LENGTH = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Dagster refuses these inside partition keys; a comma would read as two keys in a CLI.
_RESERVED = (",", "[", "]", "...")


def data_root() -> Path:
    """The data root: $GEOISO_DATA_ROOT, or ./data, made absolute."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).resolve()


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
    if asset not in ASSET_NAMES:
        raise ValueError(f"unknown asset {asset!r}; expected one of {ASSET_NAMES}")
    root = root or data_root()
    return _inside(root, warehouse_dir(root) / asset / f"{check_partition_key(key)}.parquet")
