"""The envelope every geo step puts around a file's work, shared by a one-file run and a
batch: the task writes a staged file, a worker reads it back, the blocking checks judge
it, and only a file that passed is published, with the standard metadata."""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetCheckResult, MetadataValue

from geoiso_dagster import dataroot, fsutil, paths
from geoiso_dagster.defs.checks import check_results
from geoiso_dagster.defs.own_steps import OWN_FACTS_KEY, Step
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.pool import TaskResult


@dataclass(frozen=True)
class FileWork:
    """One step's work on one source file: where it publishes, what it reads, and the
    step that produces the staged file from it with the config's `options` (on a
    runner, so that the same work serves a one-file step and a batch)."""

    output: Path
    # The file the step reads, in the local root (or this host's mirror of an S3 root).
    source: Path
    # What produces the staged file and says what the read-back expects (own_steps.Step).
    step: Step
    # The config's values, as the step's methods take them.
    options: Mapping[str, object] = field(default_factory=dict)
    # Other GeoParquet inputs by keyword (another asset's output of the same partition, a
    # reference layer), in the local root or this host's mirror, like `source`.
    inputs: Mapping[str, Path] = field(default_factory=dict)
    # What the blocking check judges (criteria of the step's output kind, defs/outputs.py).
    criteria: tuple[str, ...] = ()
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

    The data root says where the workers read the step's inputs (dataroot.py: a file,
    or with an S3 root an object read in place or a fetched copy, see
    FileWork.from_inbox) and how the staged file is read back (with an S3 root: uploaded
    to its staged key and read back from the bucket, so that the object judged is the
    object that will be published). An inbox source that changed while it was read is
    read again (transient).

    The staged file's folder is made here, for every task: a function of the user's own
    may write `output` with any library, which need not make its folder."""
    fsutil.make_dirs(staged.parent)
    root = dataroot.root()
    times, clock = {"upload_s": 0.0}, time.monotonic()
    reading = root.reading(runner, work.source, work.inputs, work.from_inbox)
    times["input"], clock = time.monotonic() - clock, time.monotonic()
    options = dict(work.options)
    result = work.step.produce(runner, reading.source, staged, reading.inputs, options)
    times["work"], clock = time.monotonic() - clock, time.monotonic()
    expect = work.step.inspect_kwargs(reading.source, options)
    kind = work.step.output
    seen, moved = root.read_back(runner, staged, kind.read_back, **expect)
    times.update(moved)
    root.check_unchanged(reading)
    times["read_back"] = time.monotonic() - clock - times["upload_s"]
    if line := root.transfers(asset_name, reading, times):
        runner.log(line)
    return Judged(result, check_results(asset_name, result.facts, seen.facts, work.criteria, kind))


def metadata(result: TaskResult, work: FileWork) -> dict:
    """The catalog entry of a published file (docs/design.md, Metadata): what its output
    kind shows of it, where it is, the worker that made it, the step's own facts."""
    facts = result.facts
    root = dataroot.root()
    entry = {
        **work.step.output.catalog(facts),
        "dagster/uri": MetadataValue.text(root.location(work.output)),
        "path": MetadataValue.path(root.where(paths.relative_to_root(work.output, root.local))),
        "duration_s": MetadataValue.float(result.duration_s),
        "worker_peak_rss_mb": MetadataValue.float(result.peak_rss_mb),
        "worker_pid": MetadataValue.int(result.pid),
        "worker_host": MetadataValue.text(result.host),
        "worker_sandbox": MetadataValue.text(result.sandbox),
    }
    for extra in work.step.facts:
        if extra in facts:
            entry[extra] = facts[extra]
    for name, value in facts.get(OWN_FACTS_KEY, {}).items():  # a step of the user's own
        entry.setdefault(name, value)
    return entry
