"""What counts as a source file in the inbox, when it is ready, and its sidecars.

Shared by the sensor and `geoiso add`, so both agree on what a file brings with it.
No geo imports.
"""

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from geoiso_dagster import formats, objectstore
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.paths import S3Root, check_partition_key, data_root, inbox_dir, remote_root
from geoiso_dagster.settings import check_aggregations, check_layer, check_target_crs

CONFIG_SIDECAR_SUFFIX = ".geoiso.json"
MAX_SIDECAR_BYTES = 64 * 2**10
SHAPEFILE_REQUIRED = formats.SHAPEFILE_REQUIRED
# Names that partial downloads, editors and copy tools use while a file is unfinished.
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
# Which asset's config each sidecar setting belongs to, and the type its value must have.
SIDECAR_SETTINGS = {
    "layer": "raw_features",
    "target_crs": "reprojected_features",
    "dissolve_by": "dissolved_regions",
    "aggfunc": "dissolved_regions",
    "aggregations": "dissolved_regions",
}


@dataclass(frozen=True)
class InboxFile:
    key: str
    path: Path
    fingerprint: str
    run_config: dict = field(default_factory=dict)
    size: int = 0  # bytes of the file and its companions
    changed: float = 0.0  # when the file or a companion last changed (changed_at)

    @property
    def run_key(self) -> str:
        return f"{self.key}@{self.fingerprint}"


def shapefile_parts(shp: Path) -> dict[str, Path]:
    """The parts of a shapefile that exist beside it, by lower-case suffix: the .shp's
    exact stem, the suffix as written or in upper case (as GDAL looks them up)."""
    found = {}
    for name in formats.companion_names(shp.name):
        if os.path.lexists(shp.parent / name):
            found.setdefault(name[len(shp.stem) :].lower(), shp.parent / name)
    return found


def config_sidecar(path: Path) -> Path:
    return path.with_name(path.name + CONFIG_SIDECAR_SUFFIX)


def companions(path: Path) -> list[Path]:
    """Files that travel with `path`: what its format may open beside it (a shapefile's
    parts, SQLite's -wal) and the settings sidecar."""
    names = sorted(set(formats.companion_names(path.name))) + [config_sidecar(path).name]
    return [path.parent / n for n in names if os.path.lexists(path.parent / n)]


def _read_small_regular_file(path: Path, root: Path | None) -> str:
    """The text of `path`, refusing what could hang or flood the reader: a FIFO or
    device (opened non-blocking, then checked), a link out of `root`, a large file."""
    where = str(path)
    resolved = path.resolve()
    if root is not None and not resolved.is_relative_to(root):
        raise BadInputError(where, f"is a link to {resolved}, outside the data root")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise BadInputError(where, f"cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BadInputError(where, "is not a regular file (a FIFO, device or folder)")
        if info.st_size > MAX_SIDECAR_BYTES:
            raise BadInputError(where, f"is {info.st_size} bytes; at most {MAX_SIDECAR_BYTES}")
        data = handle.read(MAX_SIDECAR_BYTES + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(where, f"is not UTF-8 text: {exc}") from None


def read_sidecar(path: Path, root: Path | None = None) -> dict:
    """Run config from `<file>.geoiso.json`, e.g. {"target_crs": "EPSG:6933",
    "dissolve_by": "continent"}. Unknown settings are refused, not ignored; every value's
    type is checked before the value itself; whatever is wrong raises BadInputError
    naming the sidecar (never another exception type, never a hang)."""
    sidecar = config_sidecar(path)
    if not os.path.lexists(sidecar):
        return {}
    return parse_sidecar(_read_small_regular_file(sidecar, root), str(sidecar))


def parse_sidecar(text: str, where: str) -> dict:
    """read_sidecar's checks on a sidecar's text; `where` names it in errors."""
    sidecar = where
    try:
        settings = json.loads(text)
    except RecursionError:
        raise BadInputError(str(sidecar), "is nested too deeply to be a settings file") from None
    except ValueError as exc:
        raise BadInputError(str(sidecar), f"is not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise BadInputError(str(sidecar), "must hold a JSON object")
    unknown = sorted(str(k) for k in set(settings) - set(SIDECAR_SETTINGS))
    if unknown:
        raise BadInputError(
            str(sidecar), f"unknown settings {unknown}; known: {sorted(SIDECAR_SETTINGS)}"
        )
    for name, value in settings.items():
        valid = (
            isinstance(value, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
            if name == "aggregations"
            else isinstance(value, str)
        )
        if not valid:
            expected = (
                "an object of column: aggregation names" if name == "aggregations" else "text"
            )
            raise BadInputError(
                str(sidecar), f"setting {name!r} must be {expected}, not {str(value)[:80]!r}"
            )
    if "target_crs" in settings:
        check_target_crs(settings["target_crs"], where=str(sidecar))
    if "layer" in settings:
        check_layer(settings["layer"], where=str(sidecar))
    check_aggregations(
        settings.get("aggfunc", "first"), settings.get("aggregations", {}), where=str(sidecar)
    )
    ops: dict = {}
    for name, value in settings.items():
        ops.setdefault(SIDECAR_SETTINGS[name], {"config": {}})["config"][name] = value
    return {"ops": ops} if ops else {}


def why_not_a_source(name: str) -> str | None:
    """Why a file named `name` is never a source on its own, or None."""
    lower = name.lower()
    if lower.startswith("."):
        return "it is hidden"
    if lower.endswith(TEMP_SUFFIXES):
        return "it has a temporary name"
    if lower.endswith(CONFIG_SIDECAR_SUFFIX):
        return "it is a settings sidecar; add the file it belongs to"
    if lower.endswith(formats.SHAPEFILE_PARTS) or lower.endswith(formats.SQLITE_PARTS):
        return "it is a part of another file (shapefile part, SQLite log); add the main file"
    return None


def check_source_name(path: Path) -> None:
    """A name that may be a source: a candidate, a safe partition key, an allowed format."""
    why = why_not_a_source(path.name)
    if why is None and path.suffix.lower() not in formats.SOURCE_SUFFIXES:
        why = (
            f"its format {path.suffix or '(no suffix)'!r} is not on the allow-list "
            f"{sorted(formats.SOURCE_SUFFIXES)}"
        )
    if why:
        raise BadInputError(path.name, f"is not a source file: {why}")
    check_partition_key(path.name)


def pending_wal(path: Path) -> str | None:
    """Why a GeoPackage is not ready: its SQLite write-ahead log holds changes."""
    wal = path.with_name(path.name + "-wal")
    if path.suffix.lower() == ".gpkg" and os.path.lexists(wal) and wal.stat().st_size > 0:
        return (
            f"{wal.name} holds changes not yet in the file (SQLite WAL); waits for a "
            "checkpoint (close the program writing it)"
        )
    return None


def changed_at(info: os.stat_result) -> float:
    """When a file last changed, content or inode: moving a file in (which keeps its
    mtime) counts as a change, as does writing it."""
    return max(info.st_mtime, info.st_ctime)


def _fingerprint(files: list[Path]) -> str:
    return _digest({f.name: f.stat() for f in files})


def _digest(stats: dict[str, os.stat_result]) -> str:
    parts = [
        f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        for name, st in sorted(stats.items())
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class Scan:
    ready: list[InboxFile] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    unchanged: int = 0  # candidates not changed since `since`: not looked at again
    # candidates skipped because their fingerprint was in `seen`: (fingerprint, changed_at)
    seen_again: dict[str, tuple[str, float]] = field(default_factory=dict)


def scan(
    root: Path | None = None,
    settle_s: float = 5.0,
    now: float | None = None,
    since: float | None = None,
    seen: dict[str, str] | None = None,
) -> Scan:
    """Look at the inbox once. A file is ready when it, its parts and its sidecar have
    not changed for `settle_s` seconds; a shapefile also needs its .shx and .dbf.

    With `since`, a candidate whose every file last changed at or before it is counted
    as unchanged and not looked at again: one directory listing and one lstat per entry,
    so that an inbox of ten thousand processed files costs milliseconds. So is one whose
    fingerprint is its entry in `seen` (name: fingerprint of a file already taken)."""
    now = time.time() if now is None else now
    if root is None and (remote := remote_root()) is not None:
        return scan_bucket(remote, settle_s, now, since, seen)
    root = (root or data_root()).resolve()
    inbox = inbox_dir(root)
    result = Scan()
    try:
        with os.scandir(inbox) as listing:
            entries = {entry.name: entry for entry in listing}
    except (FileNotFoundError, NotADirectoryError):
        return result
    for name in sorted(entries):
        if why_not_a_source(name) is not None:
            continue
        known = since is not None or bool(seen and name in seen)
        stats = _entry_stats(entries, name) if known else None
        if stats is not None and since is not None and _changed(stats) <= since:
            result.unchanged += 1
            continue
        if stats is not None and seen and name in seen:
            fingerprint = _digest(stats)
            if fingerprint == seen[name]:
                result.unchanged += 1
                result.seen_again[name] = (fingerprint, _changed(stats))
                continue
        try:
            item, waiting = _look_at(inbox / name, root, settle_s, now)
        except BadInputError as exc:
            result.refused[name] = exc.cause if exc.path == name else str(exc)
            continue
        except FileNotFoundError:
            continue  # moved away while we looked
        except Exception as exc:  # noqa: BLE001 - one file never stops the scan of others
            result.refused[name] = f"could not be looked at: {type(exc).__name__}: {exc}"
            continue
        if item is not None:
            result.ready.append(item)
        elif waiting:
            result.waiting[name] = waiting
    return result


def _entry_stats(entries: dict[str, os.DirEntry], name: str) -> dict[str, os.stat_result] | None:
    """The lstat of `name`, its parts and its sidecar, by name, from the directory
    listing; None when one is a link (its target's changes do not show on it) or has
    gone: such a file is looked at in full."""
    stats = {}
    for each in [name, *formats.companion_names(name), name + CONFIG_SIDECAR_SUFFIX]:
        entry = entries.get(each)
        if entry is None:
            continue
        try:
            if entry.is_symlink():
                return None
            stats[each] = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None
    return stats


def _changed(stats: dict[str, os.stat_result]) -> float:
    return max(changed_at(st) for st in stats.values())


def _look_at(path: Path, root: Path, settle_s: float, now: float):
    """(InboxFile, None) when `path` is ready, (None, why) while it waits, (None, None)
    for what is not a file; BadInputError when it is refused."""
    check_source_name(path)
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        raise BadInputError(path.name, f"is a link to {path.resolve()}, outside the data root")
    if not path.is_file():
        return None, None
    files = [path, *companions(path)]
    for part in files:
        if not part.resolve().is_relative_to(root):
            raise BadInputError(path.name, f"{part.name} is a link out of the data root")
        if not part.is_file():
            raise BadInputError(path.name, f"{part.name} is not a regular file")
    if path.suffix.lower() == ".shp":
        missing = [s for s in SHAPEFILE_REQUIRED if s not in shapefile_parts(path)]
        if missing:
            return None, f"shapefile waits for its {', '.join(missing)}"
    if why := pending_wal(path):
        return None, why
    infos = [f.stat() for f in files]
    youngest = max(changed_at(info) for info in infos)
    if now - youngest < settle_s:
        return None, f"changed {now - youngest:.1f} s ago; waits {settle_s:g} s"
    config = read_sidecar(path, root)
    size = sum(info.st_size for info in infos)
    return InboxFile(path.name, path, _fingerprint(files), config, size, youngest), None


def scan_bucket(
    root: S3Root,
    settle_s: float = 5.0,
    now: float | None = None,
    since: float | None = None,
    seen: dict[str, str] | None = None,
) -> Scan:
    """scan() of an S3 root's inbox: one listing of `inbox/` (1,000 keys a request), with
    the same rules as a folder. An object is whole once it is listed, so a file is ready
    when it, its parts and its sidecar were last written `settle_s` seconds ago or more;
    its fingerprint is their names, sizes and ETags, so a re-upload is a new version.
    Only a sidecar is read (a small GET); sources are fetched by the workers."""
    now = time.time() if now is None else now
    result = Scan()
    entries = {
        info.key.rpartition("/")[2]: info for info in objectstore.list_objects(root, "inbox")
    }
    local_inbox = inbox_dir(data_root())
    for name in sorted(entries):
        if why_not_a_source(name) is not None:
            continue
        infos = {
            each: entries[each]
            for each in [name, *formats.companion_names(name), name + CONFIG_SIDECAR_SUFFIX]
            if each in entries
        }
        changed = max(info.modified for info in infos.values())
        if since is not None and changed <= since:
            result.unchanged += 1
            continue
        fingerprint = _object_digest(infos)
        if seen and seen.get(name) == fingerprint:
            result.unchanged += 1
            result.seen_again[name] = (fingerprint, changed)
            continue
        try:
            item, waiting = _look_at_object(root, name, infos, fingerprint, settle_s, now)
        except BadInputError as exc:
            result.refused[name] = exc.cause if exc.path == name else str(exc)
            continue
        if item is not None:
            result.ready.append(
                InboxFile(name, local_inbox / name, fingerprint, item, _item_size(infos), changed)
            )
        elif waiting:
            result.waiting[name] = waiting
    return result


def _item_size(infos: dict[str, "objectstore.ObjectInfo"]) -> int:
    return sum(
        info.size for name, info in infos.items() if not name.endswith(CONFIG_SIDECAR_SUFFIX)
    )


def _object_digest(infos: dict[str, "objectstore.ObjectInfo"]) -> str:
    parts = [f"{name}:{info.size}:{info.etag}" for name, info in sorted(infos.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _look_at_object(root: S3Root, name: str, infos: dict, fingerprint: str, settle_s, now):
    """(run config, None) when the object is ready, (None, why) while it waits;
    BadInputError when it is refused."""
    check_source_name(Path(name))
    lower = name.lower()
    if lower.endswith(".shp"):
        stem = name[: -len(".shp")]
        have = {n[len(stem) :].lower() for n in infos}
        missing = [s for s in SHAPEFILE_REQUIRED if s not in have]
        if missing:
            return None, f"shapefile waits for its {', '.join(missing)}"
    wal = infos.get(name + "-wal")
    if lower.endswith(".gpkg") and wal is not None and wal.size > 0:
        return None, (
            f"{name}-wal holds changes not yet in the file (SQLite WAL); waits for a "
            "checkpoint (close the program writing it)"
        )
    youngest = max(info.modified for info in infos.values())
    if now - youngest < settle_s:
        return None, f"changed {now - youngest:.1f} s ago; waits {settle_s:g} s"
    sidecar = infos.get(name + CONFIG_SIDECAR_SUFFIX)
    if sidecar is None:
        return {}, None
    where = f"s3://{root.bucket}/{sidecar.key}"
    data = objectstore.read_small(root, sidecar.key, MAX_SIDECAR_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(where, f"is not UTF-8 text: {exc}") from None
    return parse_sidecar(text, where), None
