"""The envelope every geo step puts around a file's work, shared by a one-file run and a
batch: the task writes a staged file, a worker reads it back, the blocking checks judge
it, and only a file that passed is published, with the standard metadata."""

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetCheckResult, MetadataValue, TableColumn, TableSchema

from geoiso_dagster import fsutil, objectstore, paths
from geoiso_dagster.defs.checks import check_results
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.errors import BadInputError, GeoisoError, TransientIOError
from geoiso_dagster.pool import TaskResult

# Where a step of the user's own (defs/steps.py) leaves the facts its function returned:
# each goes to the catalog under its own name, after the standard entries.
OWN_FACTS_KEY = "step_facts"
# Step-specific facts of the built-in tasks that go to the catalog as they are.
_BUILT_IN_FACTS = (
    "transformed",
    "dropped_m",
    "repaired_geometries",
    "dropped_null_keys",
    "dropped_non_polygonal",
    "coverage_union_groups",
    "unary_union_groups",
    "fanned_out_over",
    "giant_groups",
    "union_tasks",
)


@dataclass(frozen=True)
class FileWork:
    """One step's work on one source file: where it publishes, what it reads, how it
    produces the staged file from what it reads (on a runner, so that the same plan
    serves a one-file step and a batch), and what the read-back is told to expect."""

    output: Path
    # The file the step reads, in the local root (or this host's mirror of an S3 root).
    source: Path
    # (runner, staged file, source as the workers read it, the other inputs as the
    # workers read them) -> the task's result
    produce: Callable[[TaskRunner, Path, str, dict[str, str]], TaskResult]
    # source as the workers read it -> the read-back's keyword arguments
    inspect_kwargs: Callable[[str], dict] = field(default=lambda source: {})
    # Other GeoParquet inputs by keyword (another asset's output of the same partition, a
    # reference layer), in the local root or this host's mirror, like `source`.
    inputs: Mapping[str, Path] = field(default_factory=dict)
    # What the blocking check judges (defs/checks.py); None: the built-in asset's own.
    criteria: tuple[str, ...] | None = None
    # An inbox source rather than an upstream GeoParquet output. With an S3 root both are
    # read in place (GDAL's /vsis3/ or Arrow, by range requests), except a zip archive or
    # a name GDAL cannot be given safely (fetched whole with its parts into the mirror),
    # and an upstream output this host's mirror holds the current version of.
    from_inbox: bool = False


@dataclass
class Judged:
    """A staged file with the step's result, the read-back and the checks' verdicts."""

    result: TaskResult
    checks: list[AssetCheckResult]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failed_checks(self) -> list[str]:
        """The criteria that failed (defs/checks.py), by name."""
        return [str(check.metadata["failed"].value) for check in self.checks if not check.passed]


def stage_and_judge(runner: TaskRunner, asset_name: str, work: FileWork, staged: Path) -> Judged:
    """Produce `staged` and judge it; raises what the runner raises.

    With an S3 root, the workers read the step's input in place (or from a fetched copy,
    see FileWork.from_inbox), and the staged file is uploaded to its staged key and read
    back from the bucket for the checks: the object judged is the object that will be
    published. An inbox source that changed while it was read is read again (transient).

    The staged file's folder is made here, for every task: a function of the user's own
    may write `output` with any library, which need not make its folder."""
    staged.parent.mkdir(parents=True, exist_ok=True)
    remote = paths.remote_root()
    if remote is None:
        source = str(work.source)
        inputs = {name: str(path) for name, path in work.inputs.items()}
        result = work.produce(runner, staged, source, inputs)
        seen = runner.run("inspect", path=str(staged), **work.inspect_kwargs(source))
        return Judged(result, _judged(asset_name, work, result, seen))
    clock = time.monotonic()
    relative = paths.relative_to_root(work.source)
    versions = None
    if work.from_inbox and in_place(remote.uri_of(relative)):
        source, how = remote.uri_of(relative), "read in place"
        versions = objectstore.versions(remote, relative)
    elif work.from_inbox:
        fetched = runner.run("fetch", relative=relative, source=True).facts["fetched_bytes"]
        source, how = str(work.source), f"fetch {_mb(fetched)}"
    else:
        source = upstream_location(remote, work.source)
        how = "read in place" if source.startswith("s3://") else "mirror current"
    inputs = {name: upstream_location(remote, path) for name, path in work.inputs.items()}
    fetch_s, clock = time.monotonic() - clock, time.monotonic()
    result = work.produce(runner, staged, source, inputs)
    produce_s, clock = time.monotonic() - clock, time.monotonic()
    staged_relative = paths.relative_to_root(staged)
    uploaded = runner.run("upload", path=str(staged), relative=staged_relative).facts
    upload_s, clock = time.monotonic() - clock, time.monotonic()
    seen = runner.run("inspect_object", relative=staged_relative, **work.inspect_kwargs(source))
    if versions is not None and objectstore.versions(remote, relative) != versions:
        # Its objects were read by several requests (and workers): all from one version,
        # or the step runs again on the new one.
        raise TransientIOError(f"{source}: changed while it was being read; read again")
    runner.log(
        f"{asset_name}: S3 transfers: input ({how}) in {fetch_s:.1f} s, "
        f"work {produce_s:.1f} s, upload {_mb(uploaded['bytes'])} in {upload_s:.1f} s, "
        f"read back and checked in {time.monotonic() - clock:.1f} s"
    )
    return Judged(result, _judged(asset_name, work, result, seen))


def _judged(asset_name: str, work: FileWork, result: TaskResult, seen: TaskResult) -> list:
    return check_results(asset_name, result.facts, seen.facts, work.criteria)


# How inbox sources of an S3 root are read: "in-place" (range requests; the default) or
# "fetch" (whole, into this host's mirror first: for a store whose requests are slow).
SOURCES_ENV = "GEOISO_S3_SOURCES"


def in_place(uri: str) -> bool:
    """Whether the workers read inbox object `uri` where it is, rather than a fetched copy:
    sources are read in place (GEOISO_S3_SOURCES), it is not a zip (unpacked from a local
    file), and its name can be given to GDAL safely."""
    how = os.environ.get(SOURCES_ENV) or "in-place"
    if how not in ("in-place", "fetch"):
        raise BadInputError(f"{SOURCES_ENV}={how!r}", "must be 'in-place' or 'fetch'")
    if how == "fetch" or uri.lower().endswith(".zip"):
        return False
    return objectstore.gdal_readable(uri)


def upstream_location(remote: paths.S3Root, local: Path) -> str:
    """Where the workers read an upstream output of an S3 root: this host's mirror when it
    holds the published version (same ETag: the step before ran here), else the object
    itself, in place (BadInputError when it was never published)."""
    relative = paths.relative_to_root(local)
    info = objectstore.head(remote, remote.key(relative))
    with objectstore.mirror_lock(local):
        if objectstore.mirror_holds(local, info):
            return str(local)
    return remote.uri_of(relative)


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def sweep(output: Path) -> None:
    """Remove what dead writers of `output` left: local temps and, with an S3 root, staged
    objects and open multipart uploads."""
    fsutil.sweep_stale_temps(output)
    remote = paths.remote_root()
    if remote is not None:
        objectstore.sweep_staged(remote, remote.key(paths.relative_to_root(output)))


def discard(staged: Path) -> None:
    """Remove what an attempt that will not be published wrote, once none of its tasks
    runs (the runner waits for that): the staged file and its staged object (uploaded
    only while the local file exists: publishing moves both), and every temp made from
    the staged name (fan-out parts and the workers' temps), whatever ended the attempt."""
    remote = paths.remote_root()
    if remote is not None and staged.exists():
        try:
            objectstore.discard_staged(remote, remote.key(paths.relative_to_root(staged)))
        except GeoisoError:
            # The bucket is away: the next writer's sweep removes the staged pair.
            fsutil.remove_attempt(staged, keep_staged=True)
            return
    fsutil.remove_attempt(staged)


def publish(staged: Path, output: Path) -> float:
    """Make a checked staged file the published output. With an S3 root the staged object
    becomes the published key (the truth), then the mirror keeps the file for the steps
    after this one on this host; returns the seconds that took (0 for a local root)."""
    remote = paths.remote_root()
    if remote is not None:
        clock = time.monotonic()
        key = remote.key(paths.relative_to_root(output))
        objectstore.publish(remote, remote.key(paths.relative_to_root(staged)), key)
        etag = objectstore.head(remote, key).etag
        with objectstore.mirror_lock(output):
            objectstore.etag_file(output).unlink(missing_ok=True)
            fsutil.publish(staged, output)
            objectstore.remember(output, etag)
        return time.monotonic() - clock
    fsutil.publish(staged, output)
    return 0.0


def location(path: Path) -> str:
    """Where users find an output: its file URI, or its s3:// URI with an S3 root."""
    remote = paths.remote_root()
    return remote.uri_of(paths.relative_to_root(path)) if remote else path.as_uri()


def metadata(result: TaskResult, path: Path) -> dict:
    """The catalog entry of a published file (DESIGN.md, Metadata)."""
    facts = result.facts
    uri = location(path)
    entry = {
        "dagster/row_count": MetadataValue.int(facts["rows"]),
        "dagster/column_schema": TableSchema(
            columns=[TableColumn(name=c["name"], type=c["type"]) for c in facts["columns"]]
        ),
        "dagster/uri": MetadataValue.text(uri),
        "path": MetadataValue.path(uri if uri.startswith("s3://") else str(path)),
        "crs": MetadataValue.text(facts["crs"]),
        "crs_name": MetadataValue.text(facts["crs_name"]),
        "bbox": MetadataValue.json({"minx_miny_maxx_maxy": facts["bbox"]}),
        "geometry_types": MetadataValue.text(", ".join(facts["geometry_types"])),
        "bytes": MetadataValue.int(facts["bytes"]),
        "row_groups": MetadataValue.int(facts["row_groups"]),
        "duration_s": MetadataValue.float(result.duration_s),
        "worker_peak_rss_mb": MetadataValue.float(result.peak_rss_mb),
        "worker_pid": MetadataValue.int(result.pid),
        "worker_host": MetadataValue.text(result.host),
    }
    for library, version in facts["versions"].items():
        entry[f"{library}_version"] = MetadataValue.text(version)
    if "thumbnail_png" in facts:
        entry["map"] = MetadataValue.md(
            f"![{facts['rows']} regions](data:image/png;base64,{facts['thumbnail_png']})"
        )
    for extra in _BUILT_IN_FACTS:
        if extra in facts:
            entry[extra] = facts[extra]
    for name, value in facts.get(OWN_FACTS_KEY, {}).items():  # a step of the user's own
        entry.setdefault(name, value)
    return entry
