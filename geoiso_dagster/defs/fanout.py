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

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from geoiso_dagster import dataroot, fsutil
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.errors import GeoisoError
from geoiso_dagster.fsutil import temp_path_for
from geoiso_dagster.pool import TaskResult

FAN_OUT_MIN_ROWS = 200_000
# Partial unions of a giant group per union_partials task (kept equal to spatial/union.py's
# FAN_IN, which this layer cannot import: it loads GEOS).
FAN_IN = 16
# Sources smaller than this are ingested as one task without asking how many features
# they hold (the survey is a task too): about 130k polygons of a GeoPackage.
FAN_OUT_MIN_BYTES = 32 * 2**20


def _metadata(source: str | Path) -> pq.FileMetaData:
    """The footer of a GeoParquet input: a local file, or an object read in place."""
    return dataroot.root().parquet_metadata(str(source))


def plan_row_groups(source: str | Path, workers: int) -> list[list[int]] | None:
    """Contiguous runs of row groups with about equal rows, or None: do not fan out."""
    metadata = _metadata(source)
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


def ingest(runner: TaskRunner, source: str, staged: Path, layer: str | None = None) -> TaskResult:
    """The ingest task, fanned out over ranges of features when the file is large
    enough to be worth it (the survey is a task too: the input is not trusted here)."""
    plan = None
    if runner.max_workers >= 2 and _size(source) >= FAN_OUT_MIN_BYTES:
        survey = runner.run("survey", source=source, layer=layer, scratch=str(staged))
        plan = plan_features(survey.facts, runner.max_workers)
    if plan is None:
        return runner.run("ingest", source=source, output=str(staged), layer=layer)
    identity = survey.facts.get("identity")  # every part reads the file the survey saw
    runner.log(f"fanning the ingest out over {len(plan)} workers: features {plan}")
    results, joined = fan_out(
        runner,
        staged,
        ("ingest", {"source": source, "layer": layer, "identity": identity}),
        [{"features": features} for features in plan],
        concatenate_ingested,
    )
    return combined(joined, results)


def concatenate_ingested(parts: list[Path], results: list[TaskResult]) -> tuple[str, dict]:
    """The join of ingest parts: their files, with each part's `geo` and sorted runs."""
    return "concatenate", {
        "parts": [str(p) for p in parts],
        "geos": [r.facts["geo"] for r in results],
        "runs": [r.facts["runs"] for r in results],
    }


def concatenate_parts(parts: list[Path], results: list[TaskResult]) -> tuple[str, dict]:
    """The join of parts of one GeoParquet input: their files and sorted runs."""
    return "concatenate", {
        "parts": [str(p) for p in parts],
        "runs": [r.facts["runs"] for r in results],
    }


def join_parts(parts: list[Path], results: list[TaskResult]) -> tuple[str, dict]:
    """The join of a step of one's own's parts (it reports no runs)."""
    return "join_parts", {"parts": [str(p) for p in parts]}


def _size(source: str) -> int:
    """The size of a source file or object (0 when it cannot be known: the task names
    what is wrong with it)."""
    try:
        return dataroot.root().size(source)
    except (OSError, GeoisoError):
        return 0


def reproject(runner: TaskRunner, source: str, staged: Path, target_crs: str) -> TaskResult:
    """The reproject task, fanned out over row groups when the file is large."""
    plan = plan_row_groups(source, runner.max_workers)
    if plan is None:
        return runner.run("reproject", source=source, output=str(staged), target_crs=target_crs)
    runner.log(f"fanning out over {len(plan)} workers: row groups {plan}")
    results, joined = fan_out(
        runner,
        staged,
        ("reproject", {"source": source, "target_crs": target_crs}),
        [{"row_groups": groups} for groups in plan],
        concatenate_parts,
    )
    return combined(
        joined,
        results,
        transformed=any(r.facts["transformed"] for r in results),
        dropped_m=sum(r.facts["dropped_m"] for r in results),
    )


def fan_out(
    runner: TaskRunner,
    staged: Path,
    task: tuple[str, dict],
    each: list[dict],
    join: Callable[[list[Path], list[TaskResult]], tuple[str, dict]],
) -> tuple[list, TaskResult]:
    """Run `task` (function, shared arguments) once per entry of `each` (that part's own
    arguments) side by side, each writing a temp file beside `staged`; then the task
    `join(parts, results)` names (one of the join functions here), into `staged`. The
    part files never outlive this call."""
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
        for part in parts:  # with every temp of it (a killed part's worker leaves its folder)
            fsutil.remove_attempt(part)
    return results, joined


def combined(joined: TaskResult, results: list[TaskResult], **facts) -> TaskResult:
    """One TaskResult for the step: the joined file's facts, the parts' counts, the
    highest worker peak, and the parts' (parallel) time plus the join's."""
    return TaskResult(
        facts=joined.facts | facts | {"fanned_out_over": len(results)},
        pid=joined.pid,
        peak_rss_mb=max(r.peak_rss_mb for r in [*results, joined]),
        duration_s=max(r.duration_s for r in results) + joined.duration_s,
        tasks_run=joined.tasks_run,
        host=joined.host,
        # The weakest confinement among them: a part that ran unconfined says so.
        sandbox=next(
            (r.sandbox for r in [*results, joined] if not r.sandbox.startswith("on")),
            joined.sandbox,
        ),
    )


_DISSOLVE_COUNTS = (
    "repaired_geometries",
    "dropped_null_keys",
    "dropped_non_polygonal",
    "coverage_union_groups",
    "unary_union_groups",
)


def dissolve(runner: TaskRunner, source: str, staged: Path, **options) -> TaskResult:
    """The dissolve task, in parts a worker can hold when the file is large: a plan (a
    task: it reads the key column) cuts the sorted keys into ranges of at most a tenth
    of a worker's ceiling of data, at least one per worker; a group larger than that on
    its own is unioned in chunks and the chunks' unions in turn (spatial/union.py). A
    last task joins the parts into one file."""
    rows = _metadata(source).num_rows
    if rows < FAN_OUT_MIN_ROWS:
        return runner.run("dissolve", source=source, output=str(staged), **options)
    by = options["dissolve_by"]
    plan = runner.run(
        "plan_dissolve",
        source=source,
        dissolve_by=by,
        memory_limit_mb=runner.memory_limit_mb,
        min_parts=runner.max_workers,
    ).facts
    if plan["parts"] is None:
        return runner.run("dissolve", source=source, output=str(staged), **options)
    giants = plan["giants"]
    runner.log(
        f"dissolving {plan['groups']} groups in {len(plan['parts'])} parts of at most "
        f"{plan['budget_mb']} MB (a tenth of memory_limit_mb={runner.memory_limit_mb})"
        + "".join(
            f"; group {g['key']!r} ({g['rows']} features, {g['mb']} MB) unioned in "
            f"{len(g['chunks'])} chunks"
            for g in giants
        )
    )
    temps = Temps(staged)
    try:
        calls = [
            (
                "dissolve",
                {
                    "source": source,
                    **options,
                    "ranks": ranks,
                    "row_groups": groups,
                    "output": temps.new(),
                },
            )
            for ranks, groups in zip(plan["parts"], plan["part_row_groups"], strict=True)
        ]
        chunk_calls = [
            (
                "dissolve_chunk",
                {
                    "source": source,
                    **options,
                    "rank": g["rank"],
                    "row_groups": chunk,
                    "output": temps.new(),
                },
            )
            for g in giants
            for chunk in g["chunks"]
        ]
        results = runner.run_all(calls + chunk_calls)
        parts, chunks = results[: len(calls)], results[len(calls) :]
        finals, union_tasks = _union_giants(runner, source, options, giants, chunks, temps)
        joined = runner.run(
            "join_dissolved",
            parts=[r.facts["path"] for r in [*parts, *finals]],
            output=str(staged),
            dissolve_by=by,
            source=source,
        )
    finally:
        temps.remove()
    everything = [*parts, *finals]
    counts = {name: sum(r.facts.get(name, 0) for r in everything) for name in _DISSOLVE_COUNTS}
    counts["dropped_null_keys"] = plan["dropped_null_keys"]
    if giants:
        counts.update(giant_groups=len(giants), union_tasks=union_tasks)
    return combined(joined, [*parts, *chunks, *finals], dissolve_by=by, **counts)


class Temps:
    """The part files of one attempt's step, named from its staged file, removed
    together when the step ends."""

    def __init__(self, staged: Path) -> None:
        self.staged = staged
        self.paths: list[Path] = []

    def new(self) -> str:
        self.paths.append(temp_path_for(self.staged))
        return str(self.paths[-1])

    def remove(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


def _union_giants(
    runner, source, options, giants, chunks, temps: "Temps"
) -> tuple[list[TaskResult], int]:
    """Union each giant group's chunk unions FAN_IN at a time, level by level (all the
    groups' tasks of a level side by side), down to one row per group."""
    fan_in = FAN_IN
    pending, at = [], 0
    for g in giants:
        pending.append([r.facts["path"] for r in chunks[at : at + len(g["chunks"])]])
        at += len(g["chunks"])
    finals: list[TaskResult | None] = [None] * len(giants)
    tasks = 0
    while any(paths is not None for paths in pending):
        calls, owners = [], []
        for i, paths in enumerate(pending):
            if paths is None:
                continue
            final = len(paths) <= fan_in
            for start in range(0, len(paths), fan_in):
                calls.append(
                    (
                        "union_partials",
                        {
                            "partials": paths[start : start + fan_in],
                            "output": temps.new(),
                            "source": source,
                            "dissolve_by": options["dissolve_by"],
                            "rank": giants[i]["rank"],
                            "group_rows": giants[i]["rows"],
                            "memory_limit_mb": runner.memory_limit_mb,
                            "final": final,
                            "aggfunc": options.get("aggfunc", "first"),
                            "aggregations": options.get("aggregations"),
                        },
                    )
                )
                owners.append(i)
        results = runner.run_all(calls)
        tasks += len(calls)
        next_pending: list = [None] * len(giants)
        for i, result in zip(owners, results, strict=True):
            if pending[i] is not None and len(pending[i]) <= fan_in:
                finals[i] = result
            else:
                next_pending[i] = [*(next_pending[i] or []), result.facts["path"]]
        pending = next_pending
    return [f for f in finals if f is not None], tasks
