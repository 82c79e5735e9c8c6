"""What counts as a source file in the inbox, when it is ready, and its sidecars.

Shared by the sensor and `geoiso add`, so both agree on what a file brings with it.
No geo imports.
"""

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from geoiso_dagster import dataroot, formats, fsutil
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.paths import check_partition_key

CONFIG_SIDECAR_SUFFIX = ".geoiso.json"
MAX_SIDECAR_BYTES = 64 * 2**10
# Names that partial downloads, editors and copy tools use while a file is unfinished.
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")


@dataclass(frozen=True)
class SidecarSetting:
    """A setting a <file>.geoiso.json may hold, as the asset specs declare it (Step.sidecar,
    defs/steps.sidecar_rules): the asset whose config it sets, the type of its value (str,
    or dict: an object of text: text), and that asset's check of its settings, called as
    check(the sidecar's settings of that asset, where=the sidecar)."""

    asset: str
    type: type = str
    check: Callable[..., None] | None = None


# Setting name -> SidecarSetting: the allow-list of a sidecar's settings.
SidecarRules = Mapping[str, SidecarSetting]


@dataclass(frozen=True)
class InboxFile:
    key: str
    path: Path
    fingerprint: str
    run_config: dict = field(default_factory=dict)
    size: int = 0  # bytes of the file and its companions
    changed: float = 0.0  # when the file or a companion last changed (Entry.changed)

    @property
    def run_key(self) -> str:
        return f"{self.key}@{self.fingerprint}"


def config_sidecar(path: Path) -> Path:
    return path.with_name(path.name + CONFIG_SIDECAR_SUFFIX)


def companions(path: Path) -> list[Path]:
    """Files that travel with `path`: what its format may open beside it (a shapefile's
    parts, SQLite's -wal) and the settings sidecar."""
    names = sorted(set(formats.companion_names(path.name))) + [config_sidecar(path).name]
    return [path.parent / n for n in names if os.path.lexists(path.parent / n)]


def read_sidecar(path: Path, rules: SidecarRules, root: Path | None = None) -> dict:
    """Run config from `<file>.geoiso.json`, e.g. {"target_crs": "EPSG:6933",
    "dissolve_by": "continent"}. Settings the `rules` do not name are refused, not
    ignored; every value's type is checked before the value itself; whatever is wrong
    raises BadInputError naming the sidecar (never another exception type, never a hang)."""
    sidecar = config_sidecar(path)
    if not os.path.lexists(sidecar):
        return {}
    return parse_sidecar(
        fsutil.read_small_regular_file(sidecar, root, MAX_SIDECAR_BYTES), str(sidecar), rules
    )


def parse_sidecar(data: bytes, where: str, rules: SidecarRules) -> dict:
    """read_sidecar's checks on a sidecar's bytes; `where` names it in errors."""
    sidecar = where
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(where, f"is not UTF-8 text: {exc}") from None
    try:
        settings = json.loads(text)
    except RecursionError:
        raise BadInputError(str(sidecar), "is nested too deeply to be a settings file") from None
    except ValueError as exc:
        raise BadInputError(str(sidecar), f"is not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise BadInputError(str(sidecar), "must hold a JSON object")
    unknown = sorted(str(k) for k in set(settings) - set(rules))
    if unknown:
        raise BadInputError(str(sidecar), f"unknown settings {unknown}; known: {sorted(rules)}")
    for name, value in settings.items():
        if rules[name].type is dict:
            valid = isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            )
            expected = "an object of text: text (column: aggregation name)"
        else:
            valid, expected = isinstance(value, str), "text"
        if not valid:
            raise BadInputError(
                str(sidecar), f"setting {name!r} must be {expected}, not {str(value)[:80]!r}"
            )
    ops: dict = {}
    for name, value in settings.items():
        ops.setdefault(rules[name].asset, {"config": {}})["config"][name] = value
    for asset, entry in ops.items():
        check = next(r.check for r in rules.values() if r.asset == asset)
        if check is not None:
            check(entry["config"], where=str(sidecar))
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


def check_delivered_parts(source: Path, parts: list[Path]) -> None:
    """Each file that travels with `source` (`geoiso add`) is a regular file of the
    delivery: not a directory, FIFO or device (a copy would fail or block), not a
    dangling link, and not a link out of the source's own folder (it would be followed
    and another file copied in under the delivery's name)."""
    folder = source.resolve().parent
    for part in parts:
        try:
            resolved = part.resolve(strict=True)
        except (OSError, RuntimeError):
            raise BadInputError(str(source), f"its {part.name} is a dangling link") from None
        if part.is_symlink() and resolved.parent != folder:
            raise BadInputError(
                str(source),
                f"its {part.name} is a link out of the delivery's folder (to {resolved}); "
                "copy the file itself beside the source",
            )
        mode = resolved.stat().st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (FIFO, device)"
            raise BadInputError(str(source), f"its {part.name} is {kind}")


def pending_wal(path: Path) -> str | None:
    """Why a GeoPackage file outside the inbox (`geoiso add`) is not ready, or None."""
    return formats.wal_waits(path.name) if formats.pending_wal_beside(path) else None


def _digest(entries: dict[str, dataroot.Entry]) -> str:
    parts = [f"{name}:{e.size}:{e.version}" for name, e in sorted(entries.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class Scan:
    ready: list[InboxFile] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    unchanged: int = 0  # candidates not changed since `since`: not looked at again
    # candidates skipped because their fingerprint was in `seen`: (fingerprint, changed)
    seen_again: dict[str, tuple[str, float]] = field(default_factory=dict)


def scan(
    settle_s: float = 5.0,
    now: float | None = None,
    since: float | None = None,
    seen: dict[str, str] | None = None,
    root: "dataroot.Root | None" = None,
    rules: SidecarRules = MappingProxyType({}),
) -> Scan:
    """Look at the inbox once (one listing: a folder's, or the bucket's `inbox/`). A file
    is ready when it, its parts and its sidecar have not changed for `settle_s` seconds;
    a shapefile also needs its .shx and .dbf, a GeoPackage an empty SQLite log.

    With `since`, a candidate whose every file last changed at or before it is counted
    as unchanged and not looked at again, so that an inbox of ten thousand processed
    files costs one listing. So is one whose fingerprint (its files' names, sizes and
    versions) is its entry in `seen` (name: fingerprint of a file already taken).
    Only a sidecar is read (judged by `rules`: with none, a file with a sidecar is
    refused); sources are read by the workers."""
    now = time.time() if now is None else now
    root = root or dataroot.root()
    result = Scan()
    entries = root.inbox()
    for name in sorted(entries):
        if why_not_a_source(name) is not None:
            continue
        group = {
            each: entries[each]
            for each in [name, *formats.companion_names(name), name + CONFIG_SIDECAR_SUFFIX]
            if each in entries
        }
        changed = max(entry.changed for entry in group.values())
        if since is not None and changed <= since:
            result.unchanged += 1
            continue
        fingerprint = _digest(group)
        if seen and seen.get(name) == fingerprint:
            result.unchanged += 1
            result.seen_again[name] = (fingerprint, changed)
            continue
        try:
            config, waiting = _look_at(root, name, group, settle_s, now, rules)
        except BadInputError as exc:
            result.refused[name] = exc.cause if exc.path == name else str(exc)
            continue
        except FileNotFoundError:
            continue  # moved away while we looked
        except Exception as exc:  # noqa: BLE001 - one file never stops the scan of others
            result.refused[name] = f"could not be looked at: {type(exc).__name__}: {exc}"
            continue
        if config is not None:
            size = sum(e.size for n, e in group.items() if not n.endswith(CONFIG_SIDECAR_SUFFIX))
            path = root.local / "inbox" / name
            result.ready.append(InboxFile(name, path, fingerprint, config, size, changed))
        elif waiting:
            result.waiting[name] = waiting
    return result


def _look_at(
    root: "dataroot.Root", name: str, group: dict, settle_s: float, now: float, rules: SidecarRules
):
    """(run config, None) when source `name` is ready, (None, why) while it waits,
    (None, None) for what is not a file (a folder); BadInputError when it is refused.
    `group` holds its entry and those of its parts and sidecar, by name."""
    check_source_name(Path(name))
    main = group[name]
    if main.problem:
        raise BadInputError(name, main.problem)
    if not main.regular:
        return None, None
    for each, entry in group.items():
        if entry.problem:
            raise BadInputError(name, f"{each} is a link out of the data root")
        if not entry.regular:
            raise BadInputError(name, f"{each} is not a regular file")
    if missing := formats.missing_shapefile_parts(name, group):
        return None, f"shapefile waits for its {', '.join(missing)}"
    if formats.pending_wal(name, {n: e.size for n, e in group.items()}):
        return None, formats.wal_waits(name)
    youngest = max(entry.changed for entry in group.values())
    if now - youngest < settle_s:
        return None, f"changed {now - youngest:.1f} s ago; waits {settle_s:g} s"
    if name + CONFIG_SIDECAR_SUFFIX not in group:
        return {}, None
    data, where = root.read_small(f"inbox/{name}{CONFIG_SIDECAR_SUFFIX}", MAX_SIDECAR_BYTES)
    return parse_sidecar(data, where, rules), None
