"""What counts as a source file in the inbox, when it is ready, and its sidecars.

Shared by the sensor and `geoiso add`, so both agree on what a file brings with it.
No geo imports.
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.paths import check_partition_key, data_root, inbox_dir
from geoiso_dagster.settings import check_aggregations, check_target_crs

CONFIG_SIDECAR_SUFFIX = ".geoiso.json"
# A shapefile is a .shp plus these; GDAL cannot read it without the required ones.
SHAPEFILE_REQUIRED = (".shx", ".dbf")
SHAPEFILE_OPTIONAL = (".prj", ".cpg", ".qix", ".sbn", ".sbx", ".shp.xml")
_SHAPEFILE_PARTS = SHAPEFILE_REQUIRED + SHAPEFILE_OPTIONAL
# Names that partial downloads, editors and copy tools use while a file is unfinished.
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
# Which asset's config each sidecar setting belongs to.
SIDECAR_SETTINGS = {
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

    @property
    def run_key(self) -> str:
        return f"{self.key}@{self.fingerprint}"


def _stem_matches(main: Path, other: Path, suffix: str) -> bool:
    return other.name.lower() == (main.stem + suffix).lower()


def shapefile_parts(shp: Path) -> dict[str, Path]:
    """The sidecar files of a shapefile that exist beside it, by suffix (any case)."""
    found = {}
    for candidate in shp.parent.iterdir():
        for suffix in _SHAPEFILE_PARTS:
            if _stem_matches(shp, candidate, suffix):
                found[suffix] = candidate
    return found


def config_sidecar(path: Path) -> Path:
    return path.with_name(path.name + CONFIG_SIDECAR_SUFFIX)


def companions(path: Path) -> list[Path]:
    """Files that travel with `path`: a shapefile's parts and the settings sidecar."""
    files = list(shapefile_parts(path).values()) if path.suffix.lower() == ".shp" else []
    sidecar = config_sidecar(path)
    if sidecar.exists():
        files.append(sidecar)
    return files


def read_sidecar(path: Path) -> dict:
    """Run config from `<file>.geoiso.json`, e.g. {"target_crs": "EPSG:6933",
    "dissolve_by": "continent"}. Unknown settings are refused, not ignored."""
    sidecar = config_sidecar(path)
    if not sidecar.exists():
        return {}
    try:
        settings = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(str(sidecar), f"is not valid JSON: {exc}") from exc
    if not isinstance(settings, dict):
        raise BadInputError(str(sidecar), "must hold a JSON object")
    unknown = sorted(set(settings) - set(SIDECAR_SETTINGS))
    if unknown:
        raise BadInputError(
            str(sidecar), f"unknown settings {unknown}; known: {sorted(SIDECAR_SETTINGS)}"
        )
    ops: dict = {}
    if "target_crs" in settings and isinstance(settings["target_crs"], str):
        check_target_crs(settings["target_crs"], where=str(sidecar))
    if isinstance(settings.get("aggfunc", ""), str) and isinstance(
        settings.get("aggregations", {}), dict
    ):
        check_aggregations(
            settings.get("aggfunc", "first"), settings.get("aggregations", {}), where=str(sidecar)
        )
    for name, value in settings.items():
        valid = isinstance(value, dict) if name == "aggregations" else isinstance(value, str)
        if not valid or (
            name == "aggregations"
            and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        ):
            raise BadInputError(str(sidecar), f"setting {name!r} has the wrong type: {value!r}")
        ops.setdefault(SIDECAR_SETTINGS[name], {"config": {}})["config"][name] = value
    return {"ops": ops} if ops else {}


def is_candidate(path: Path) -> bool:
    """A file that may be a source: not hidden, not temporary, not someone's sidecar."""
    name = path.name.lower()
    if name.startswith(".") or name.endswith(TEMP_SUFFIXES) or name.endswith(CONFIG_SIDECAR_SUFFIX):
        return False
    return not any(name.endswith(suffix) for suffix in _SHAPEFILE_PARTS)


def _fingerprint(files: list[Path]) -> str:
    parts = []
    for f in sorted(files):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class Scan:
    ready: list[InboxFile] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def scan(root: Path | None = None, settle_s: float = 5.0, now: float | None = None) -> Scan:
    """Look at the inbox once. A file is ready when it, its parts and its sidecar have
    not changed for `settle_s` seconds; a shapefile also needs its .shx and .dbf."""
    root = (root or data_root()).resolve()
    inbox = inbox_dir(root)
    result = Scan()
    if not inbox.is_dir():
        return result
    now = time.time() if now is None else now
    for path in sorted(inbox.iterdir()):
        if not is_candidate(path):
            continue
        name = path.name
        try:
            check_partition_key(name)
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise BadInputError(name, f"is a link to {path.resolve()}, outside the data root")
            if not path.is_file():
                continue
            files = [path, *companions(path)]
            if path.suffix.lower() == ".shp":
                missing = [s for s in SHAPEFILE_REQUIRED if s not in shapefile_parts(path)]
                if missing:
                    result.waiting[name] = f"shapefile waits for its {', '.join(missing)}"
                    continue
            youngest = max(f.stat().st_mtime for f in files)
            if now - youngest < settle_s:
                result.waiting[name] = f"changed {now - youngest:.1f} s ago; waits {settle_s:g} s"
                continue
            config = read_sidecar(path)
        except BadInputError as exc:
            result.refused[name] = str(exc)
            continue
        except FileNotFoundError:
            continue  # moved away while we looked
        result.ready.append(InboxFile(name, path, _fingerprint(files), config))
    return result
