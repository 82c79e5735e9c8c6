"""Steps for geo_asset (defs/steps.py): what a step runs for one partition's file.

A Step says how the staged file is produced from the step's input (the built-in assets'
plans, defs/assets.py); task_step makes the Step of a function of the user's own, named
"package.module:function". Orchestration layer: no geo import.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.checks import STEP_CRITERIA
from geoiso_dagster.defs.envelope import OWN_FACTS_KEY
from geoiso_dagster.pool import TaskResult
from geoiso_dagster.records import OutputFacts

# Facts of the standard metadata: a task's own facts of these names are not copied again.
_STANDARD_FACTS = OutputFacts.__required_keys__


@dataclass(frozen=True)
class Step:
    """How a built-in asset makes one partition's staged file, for geo_asset.

    produce(runner, staged, source, inputs, options): run the tasks; `options` are the
    config's values. inspect_kwargs(source, options): what the read-back is told to
    expect. check(options): refuse bad settings before any work (BadInputError)."""

    produce: Callable[..., TaskResult]
    inspect_kwargs: Callable[[str, dict], dict]
    check: Callable[[dict], None] = lambda options: None
    criteria: tuple[str, ...] | None = None
    library: str = "geopandas"


def task_step(
    task: str,
    name: str,
    splittable: bool,
    criteria: tuple[str, ...] | None,
    fixed: dict | None = None,
) -> Step:
    """The Step of a function of the user's own: one task (or its fan-out over the
    source's row groups), then the standard facts of the file it wrote. The function gets
    the inputs' paths, the `fixed` keyword arguments, then the config's values."""

    def produce(runner, staged: Path, source: str, inputs: dict, options: dict) -> TaskResult:
        kwargs = {**inputs, **(fixed or {}), **options}
        plan = fanout.plan_row_groups(source, runner.max_workers) if splittable else None
        if plan is None:
            results = [runner.run(task, source=source, output=str(staged), **kwargs)]
            described = runner.run("describe", path=str(staged))
        else:  # join_parts returns the joined file's standard facts: no describe after it
            runner.log(f"{name}: fanning {task} out over {len(plan)} workers: row groups {plan}")
            results, described = fanout.fan_out(
                runner,
                staged,
                (task, {"source": source, **kwargs}),
                [{"row_groups": groups} for groups in plan],
                lambda parts, results: ("join_parts", {"parts": [str(p) for p in parts]}),
            )
        facts = _own_facts(results)
        standard = described.facts | {OWN_FACTS_KEY: facts}
        if "rows" in facts:  # the task's word, which the row count check compares
            standard["rows"] = facts["rows"]
        combined = fanout.combined(described, results) if plan else results[0]
        return TaskResult(
            facts=standard | ({"fanned_out_over": len(results)} if plan else {}),
            pid=combined.pid,
            peak_rss_mb=combined.peak_rss_mb,
            duration_s=combined.duration_s,
            tasks_run=combined.tasks_run,
            host=combined.host,
        )

    return Step(
        produce=produce,
        inspect_kwargs=lambda source, options: {"expected_crs_of": source},
        criteria=criteria or STEP_CRITERIA,
    )


def _own_facts(results: list[TaskResult]) -> dict:
    """The facts a user's function returned (summed over a fan-out's parts when numbers),
    kept when they are numbers or short strings; `rows` as reported."""
    facts: dict = {}
    for result in results:  # a dict: the worker refuses anything else (pool/worker.py)
        for key, value in result.facts.items():
            if key in _STANDARD_FACTS - {"rows"} or not isinstance(key, str):
                continue
            if isinstance(value, bool) or isinstance(value, str):
                facts[key] = value[:200] if isinstance(value, str) else value
            elif isinstance(value, (int, float)):
                facts[key] = facts.get(key, 0) + value if len(results) > 1 else value
    return facts
