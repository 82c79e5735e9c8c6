"""Steps for geo_asset (defs/steps.py): what a step runs for one partition's file.

A Step says how the staged file is produced from the step's input (the built-in assets'
steps, defs/assets.py); TaskStep is the Step of a function of the user's own, named
"package.module:function". Orchestration layer: no geo import.
"""

from dataclasses import dataclass, field
from pathlib import Path

from geoiso_dagster.defs import fanout
from geoiso_dagster.defs.outputs import GEOPARQUET, OutputKind
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.pool import TaskResult
from geoiso_dagster.records import OutputFacts

# Where a step of the user's own leaves the facts its function returned: each goes to
# the catalog under its own name, after the standard entries (envelope.metadata).
OWN_FACTS_KEY = "step_facts"
# Facts of the standard metadata: a task's own facts of these names are not copied again.
_STANDARD_FACTS = OutputFacts.__required_keys__


@dataclass(frozen=True)
class Step:
    """What a geo asset runs for one partition's file, for geo_asset: a subclass says how
    (the built-in assets' steps, defs/assets.py; TaskStep for a function of one's own).

    produce(runner, source, staged, inputs, options): run the tasks that write `staged`
    from `source` (and the other `inputs`, by keyword), as the workers read them;
    `options` are the config's values. inspect_kwargs(source, options): what the
    read-back is told to expect. check(options): refuse bad settings before any work
    (BadInputError).

    output: the kind of file it writes (defs/outputs.py). criteria: what the blocking check
    judges (None: the kind's default criteria). facts: the names of step-specific facts
    its tasks return that go to the catalog as they are. sidecar: the config fields a
    source's <file>.geoiso.json may set, each with its type (str, or dict: an object of
    text: text); check(options, where) judges them too, on the sidecar's settings alone."""

    criteria: tuple[str, ...] | None = None
    library: str = "geopandas"
    output: OutputKind = GEOPARQUET
    facts: tuple[str, ...] = ()
    sidecar: tuple[tuple[str, type], ...] = ()

    def produce(
        self, runner: TaskRunner, source: str, staged: Path, inputs: dict, options: dict
    ) -> TaskResult:
        raise NotImplementedError(f"{type(self).__name__} does not say how it produces a file")

    def inspect_kwargs(self, source: str, options: dict) -> dict:
        return {}

    def check(self, options: dict, where: str | None = None) -> None:
        """Nothing to refuse by default. `options` may hold only some of the config's
        fields (a sidecar's); `where` names what set them, in the error."""


@dataclass(frozen=True)
class TaskStep(Step):
    """The step of a function of the user's own, named "package.module:function": one
    task (or its fan-out over the source's row groups when `splittable`), then the
    standard facts of the file it wrote. The function gets the inputs' paths, the
    `fixed` keyword arguments, then the config's values."""

    task: str = ""
    name: str = ""
    splittable: bool = False
    fixed: dict = field(default_factory=dict)
    facts: tuple[str, ...] = ("fanned_out_over",)

    def produce(
        self, runner: TaskRunner, source: str, staged: Path, inputs: dict, options: dict
    ) -> TaskResult:
        kwargs = {**inputs, **self.fixed, **options}
        plan = fanout.plan_row_groups(source, runner.max_workers) if self.splittable else None
        if plan is None:
            results = [runner.run(self.task, source=source, output=str(staged), **kwargs)]
            described = runner.run(self.output.describe, path=str(staged))
        else:  # join_parts returns the joined file's standard facts: no describe after it
            runner.log(
                f"{self.name}: fanning {self.task} out over {len(plan)} workers: row groups {plan}"
            )
            results, described = fanout.fan_out(
                runner,
                staged,
                (self.task, {"source": source, **kwargs}),
                [{"row_groups": groups} for groups in plan],
                fanout.join_parts,
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
            sandbox=combined.sandbox,
        )

    def inspect_kwargs(self, source: str, options: dict) -> dict:
        return {"expected_crs_of": source}


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
