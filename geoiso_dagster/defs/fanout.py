"""Fan a large step out over the pool's workers: parts side by side, then one join.

Plans are made from Parquet footers with pyarrow (no geo import): a file of at least
FAN_OUT_MIN_ROWS rows in two or more row groups is split into contiguous runs of row
groups, one per worker; each part is written as a temp file beside the output, and a
last task concatenates them in order (Arrow tables, no decoding). Smaller files run as
one task: below that size, a second worker costs more than it saves.
"""

from pathlib import Path

import pyarrow.parquet as pq
from dagster import OpExecutionContext

from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.retries import run_task, run_tasks
from geoiso_dagster.fsutil import temp_path_for
from geoiso_dagster.pool import TaskResult

FAN_OUT_MIN_ROWS = 200_000


def plan_row_groups(source: str | Path, workers: int) -> list[list[int]] | None:
    """Contiguous runs of row groups with about equal rows, or None: do not fan out."""
    metadata = pq.ParquetFile(source).metadata
    groups = metadata.num_row_groups
    if workers < 2 or groups < 2 or metadata.num_rows < FAN_OUT_MIN_ROWS:
        return None
    parts = min(workers, groups)
    share = metadata.num_rows / parts
    plan: list[list[int]] = [[] for _ in range(parts)]
    seen = 0
    for group in range(groups):
        index = min(parts - 1, int(seen // share))
        plan[index].append(group)
        seen += metadata.row_group(group).num_rows
    return [p for p in plan if p]


def reproject(
    context: OpExecutionContext,
    pool: SpatialWorkerPool,
    source: str,
    staged: Path,
    target_crs: str,
) -> TaskResult:
    """The reproject task, fanned out over row groups when the file is large."""
    plan = plan_row_groups(source, pool.max_workers)
    if plan is None:
        return run_task(
            context, pool, "reproject", source=source, output=str(staged), target_crs=target_crs
        )
    context.log.info(f"fanning out over {len(plan)} workers: row groups {plan}")
    results, joined = _fan_out(
        context,
        pool,
        staged,
        [
            lambda part, groups=groups: (
                "reproject",
                {
                    "source": source,
                    "output": str(part),
                    "target_crs": target_crs,
                    "row_groups": groups,
                },
            )
            for groups in plan
        ],
        lambda parts, results: ("concatenate", {"parts": [str(p) for p in parts]}),
    )
    return _combined(
        joined,
        results,
        transformed=any(r.facts["transformed"] for r in results),
        dropped_m=sum(r.facts["dropped_m"] for r in results),
    )


def _fan_out(context, pool, staged: Path, parts_calls: list, join) -> tuple[list, TaskResult]:
    """Run one task per part (each writing a temp file beside `staged`) side by side,
    then the joining task into `staged`; the part files never outlive this call."""
    parts = [temp_path_for(staged) for _ in parts_calls]
    try:
        results = run_tasks(
            context, pool, [make(part) for make, part in zip(parts_calls, parts, strict=True)]
        )
        function, kwargs = join(parts, results)
        joined = run_task(context, pool, function, output=str(staged), **kwargs)
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


def dissolve(
    context: OpExecutionContext,
    pool: SpatialWorkerPool,
    source: str,
    staged: Path,
    **options,
) -> TaskResult:
    """The dissolve task, fanned out by group when the file is large: each worker takes
    every n-th group (in key order), a last task joins the parts ordered by key."""
    rows = pq.ParquetFile(source).metadata.num_rows
    workers = pool.max_workers
    if workers < 2 or rows < FAN_OUT_MIN_ROWS:
        return run_task(context, pool, "dissolve", source=source, output=str(staged), **options)
    context.log.info(f"fanning the dissolve out over {workers} workers by group")
    results, joined = _fan_out(
        context,
        pool,
        staged,
        [
            lambda part, i=i: (
                "dissolve",
                {"source": source, "output": str(part), "part": [i, workers], **options},
            )
            for i in range(workers)
        ],
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
