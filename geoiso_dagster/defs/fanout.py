"""Fan a large step out over the pool's workers: parts side by side, then one join.

The orchestrator only plans, from numbers (no geo import): an ingest from a source of
at least FAN_OUT_MIN_BYTES asks a worker to survey it first (the input is untrusted),
then reads ranges of features (GDAL sources with fast random access) or runs of row
groups (GeoParquet) in one worker each; a reprojection of at least FAN_OUT_MIN_ROWS rows
splits our own GeoParquet's row groups (read from its footer with pyarrow); a dissolve
splits its groups. Each part is a temp file beside the output, and a last task joins
them in order (Arrow tables, no decoding). Smaller inputs run as one task: below that
size, a second worker costs more than it saves.
"""

import os
from pathlib import Path
from typing import Protocol

import pyarrow.parquet as pq
from dagster import OpExecutionContext

from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.retries import run_task, run_tasks
from geoiso_dagster.fsutil import temp_path_for
from geoiso_dagster.pool import TaskResult, WorkerPool


class Runner(Protocol):
    """Where a plan's tasks run: a Dagster step (StepRunner) or a bare pool (PoolRunner,
    for the benchmarks), so that both take exactly the same decisions."""

    max_workers: int

    def run(self, function: str, **kwargs) -> TaskResult: ...

    def run_all(self, calls: list[tuple[str, dict]]) -> list[TaskResult]: ...

    def log(self, message: str) -> None: ...


class StepRunner:
    """Tasks of a Dagster step: progress to the run log, failures as Failure or
    RetryRequested (defs/retries.py)."""

    def __init__(self, context: OpExecutionContext, pool: SpatialWorkerPool) -> None:
        self.context, self.pool, self.max_workers = context, pool, pool.max_workers

    def run(self, function: str, **kwargs) -> TaskResult:
        return run_task(self.context, self.pool, function, **kwargs)

    def run_all(self, calls: list[tuple[str, dict]]) -> list[TaskResult]:
        return run_tasks(self.context, self.pool, calls)

    def log(self, message: str) -> None:
        self.context.log.info(message)


class PoolRunner:
    """Tasks on a bare WorkerPool; errors raise as the pool raises them."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool, self.max_workers = pool, pool.settings.max_workers

    def run(self, function: str, **kwargs) -> TaskResult:
        return self.pool.run(function, **kwargs)

    def run_all(self, calls: list[tuple[str, dict]]) -> list[TaskResult]:
        futures = [self.pool.submit(function, **kwargs) for function, kwargs in calls]
        return [future.result() for future in futures]

    def log(self, message: str) -> None:
        pass


FAN_OUT_MIN_ROWS = 200_000
# Sources smaller than this are ingested as one task without asking how many features
# they hold (the survey is a task too): about 130k polygons of a GeoPackage.
FAN_OUT_MIN_BYTES = 32 * 2**20


def plan_row_groups(source: str | Path, workers: int) -> list[list[int]] | None:
    """Contiguous runs of row groups with about equal rows, or None: do not fan out."""
    metadata = pq.ParquetFile(source).metadata
    return _runs([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)], workers)


def _runs(group_rows: list[int], workers: int) -> list[list[int]] | None:
    groups, total = len(group_rows), sum(group_rows)
    if workers < 2 or groups < 2 or total < FAN_OUT_MIN_ROWS:
        return None
    parts = min(workers, groups)
    share = total / parts
    plan: list[list[int]] = [[] for _ in range(parts)]
    seen = 0
    for group, rows in enumerate(group_rows):
        plan[min(parts - 1, int(seen // share))].append(group)
        seen += rows
    return [p for p in plan if p]


def plan_features(survey: dict, workers: int) -> list[list[int] | None] | None:
    """The `features` argument of each ingest part ([skip, count] of a GDAL source, the
    last part reading to the end so that a file holding more than it declares is still
    caught; [first row group, row groups] of GeoParquet), or None: do not fan out."""
    if "row_groups" in survey:
        runs = _runs(survey["row_groups"], workers)
        return [[run[0], len(run)] for run in runs] if runs else None
    features = survey["features"]
    if workers < 2 or not survey["splittable"] or features < FAN_OUT_MIN_ROWS:
        return None
    share = -(-features // workers)
    return [[i * share, share] for i in range(workers - 1)] + [[(workers - 1) * share, None]]


def ingest(runner: Runner, source: str, staged: Path, layer: str | None = None) -> TaskResult:
    """The ingest task, fanned out over ranges of features when the file is large
    enough to be worth it (the survey is a task too: the input is not trusted here)."""
    plan = None
    if runner.max_workers >= 2 and _size(source) >= FAN_OUT_MIN_BYTES:
        survey = runner.run("survey", source=source, layer=layer)
        plan = plan_features(survey.facts, runner.max_workers)
    if plan is None:
        return runner.run("ingest", source=source, output=str(staged), layer=layer)
    runner.log(f"fanning the ingest out over {len(plan)} workers: features {plan}")
    results, joined = _fan_out(
        runner,
        staged,
        ("ingest", {"source": source, "layer": layer}),
        [{"features": features} for features in plan],
        lambda parts, results: (
            "concatenate",
            {"parts": [str(p) for p in parts], "geos": [r.facts["geo"] for r in results]},
        ),
    )
    return _combined(joined, results)


def _size(source: str) -> int:
    try:
        return os.stat(source).st_size
    except OSError:
        return 0  # the task names what is wrong with it


def reproject(runner: Runner, source: str, staged: Path, target_crs: str) -> TaskResult:
    """The reproject task, fanned out over row groups when the file is large."""
    plan = plan_row_groups(source, runner.max_workers)
    if plan is None:
        return runner.run("reproject", source=source, output=str(staged), target_crs=target_crs)
    runner.log(f"fanning out over {len(plan)} workers: row groups {plan}")
    results, joined = _fan_out(
        runner,
        staged,
        ("reproject", {"source": source, "target_crs": target_crs}),
        [{"row_groups": groups} for groups in plan],
        lambda parts, results: ("concatenate", {"parts": [str(p) for p in parts]}),
    )
    return _combined(
        joined,
        results,
        transformed=any(r.facts["transformed"] for r in results),
        dropped_m=sum(r.facts["dropped_m"] for r in results),
    )


def _fan_out(
    runner: Runner, staged: Path, task: tuple[str, dict], each: list[dict], join
) -> tuple[list, TaskResult]:
    """Run `task` (function, shared arguments) once per entry of `each` (that part's own
    arguments) side by side, each writing a temp file beside `staged`; then the task
    `join(parts, results)` names, into `staged`. The part files never outlive this call."""
    function, shared = task
    parts = [temp_path_for(staged) for _ in each]
    try:
        results = runner.run_all(
            [
                (function, {**shared, **own, "output": str(part)})
                for own, part in zip(each, parts, strict=True)
            ]
        )
        function, kwargs = join(parts, results)
        joined = runner.run(function, output=str(staged), **kwargs)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    return results, joined


def _combined(joined: TaskResult, results: list[TaskResult], **facts) -> TaskResult:
    """One TaskResult for the step: the joined file's facts, the parts' counts, the
    highest worker peak, and the parts' (parallel) time plus the join's."""
    return TaskResult(
        facts=joined.facts | facts | {"fanned_out_over": len(results)},
        pid=joined.pid,
        peak_rss_mb=max(r.peak_rss_mb for r in [*results, joined]),
        duration_s=max(r.duration_s for r in results) + joined.duration_s,
        tasks_run=joined.tasks_run,
    )


_DISSOLVE_COUNTS = (
    "repaired_geometries",
    "dropped_null_keys",
    "dropped_non_polygonal",
    "coverage_union_groups",
    "unary_union_groups",
)


def dissolve(runner: Runner, source: str, staged: Path, **options) -> TaskResult:
    """The dissolve task, fanned out by group when the file is large: each worker takes
    every n-th group (in key order), a last task joins the parts ordered by key."""
    rows = pq.ParquetFile(source).metadata.num_rows
    workers = runner.max_workers
    if workers < 2 or rows < FAN_OUT_MIN_ROWS:
        return runner.run("dissolve", source=source, output=str(staged), **options)
    runner.log(f"fanning the dissolve out over {workers} workers by group")
    results, joined = _fan_out(
        runner,
        staged,
        ("dissolve", {"source": source, **options}),
        [{"part": [i, workers]} for i in range(workers)],
        lambda parts, results: (
            "join_dissolved",
            {
                "parts": [r.facts["path"] for r in results],
                "dissolve_by": options["dissolve_by"],
                "source": source,
            },
        ),
    )
    counts = {name: sum(r.facts.get(name, 0) for r in results) for name in _DISSOLVE_COUNTS}
    return _combined(joined, results, dissolve_by=options["dissolve_by"], **counts)
