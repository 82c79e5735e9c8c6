"""geo_asset: a software-defined asset with the envelope every geo step here has.

One GeoParquet file per source file (the dynamic partitions), made by a task in an
isolated worker into a staged file, read back by another worker, judged by a blocking
check, published only when it passed; the standard metadata; retries by failure kind;
fan-out; a run over many files in batches; automation once upstream's checks passed.

The built-in assets (defs/assets.py) are built with it, and so is any step of a team's
own: `task` is then "package.module:function", fixed here in code (task_api.py).
Orchestration layer: nothing here imports a geo library.
"""

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    BackfillPolicy,
    Config,
    Failure,
    asset,
)
from dagster._utils.warnings import BetaWarning  # not exported; the one to silence here

from geoiso_dagster import paths
from geoiso_dagster.defs.batch import produce_files
from geoiso_dagster.defs.checks import check_specs, criteria_of
from geoiso_dagster.defs.envelope import (
    FileWork,
)
from geoiso_dagster.defs.outputs import GEOPARQUET, OutputKind
from geoiso_dagster.defs.own_steps import Step, TaskStep
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.errors import BadInputError, UnsafeNameError
from geoiso_dagster.inbox import SidecarSetting
from geoiso_dagster.task_api import check_task_ref, is_qualified

GROUP = "geo"
# Dagster concurrency pool of the heavy steps; dagster.yaml limits how many runs use it.
POOL = "geoiso_workers"
# A run may carry this many source files (partitions) at most: the sensor's batches and
# the UI's backfills are cut to it (DESIGN.md, Run model).
BATCH_MAX_FILES = 125
# Downstream waits until its upstream's blocking checks passed (or pass in this run).
_AFTER_CHECKS = AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()


@dataclass(frozen=True)
class Reference:
    """A layer every partition reads whole or in part (a boundary, a flood-zone map): a
    GeoParquet file at <data root>/reference/<name>, named by a safe file name."""

    name: str

    def __post_init__(self) -> None:
        try:
            paths.check_partition_key(self.name)  # a file name, never a path
        except UnsafeNameError as exc:
            raise ValueError(f"reference {self.name!r}: {exc.cause}") from None
        if not self.name.endswith(".parquet"):
            raise ValueError(f"reference {self.name!r}: not a GeoParquet file name (.parquet)")


AssetRef = Union[AssetsDefinition, str]


def geo_asset(
    name: str,
    *,
    task: Union[str, Step],
    upstream: Optional[AssetRef] = None,
    inputs: Optional[Mapping[str, Union[AssetRef, Reference]]] = None,
    config: Optional[type[Config]] = None,
    description: Optional[str] = None,
    splittable: bool = False,
    criteria: Optional[tuple[str, ...]] = None,
    options: Optional[Mapping[str, Any]] = None,
    group_name: str = GROUP,
    output_kind: OutputKind = GEOPARQUET,
    sidecar: tuple[str, ...] = (),
) -> AssetsDefinition:
    """An asset with the envelope of the built-in ones (see the module's docstring).

    task: "package.module:function", run in a worker as
        function(source: str, output: str, **kwargs) -> dict
      It reads `source` (upstream's GeoParquet output of the partition: a task step needs
      an upstream), writes GeoParquet to `output` and returns facts (a dict
      of JSON values): `rows` is compared with the file's (if given); the other numbers
      and strings go to the catalog. Raise geoiso_dagster.errors.BadInputError for bad
      data (a clear, non-retried failure). Or a Step (the built-in assets).
    upstream: the asset (or its name) whose output of the same partition is `source`.
    inputs: more keyword arguments of the function: an asset (or its name), passed as the
      path of its output of the same partition, or a Reference, passed as its path.
    config: a dagster Config class; its fields are passed as keyword arguments.
    splittable: the function takes `row_groups` (indices of the source's row groups) and
      handles only those rows: a large source then fans out over the workers, one run of
      row groups each, and a last task joins the parts (geoiso_dagster.ops' functions).
    criteria: what the blocking check judges (the output kind's criteria); default for
      GeoParquet: readable, row count, the source's CRS kept, coordinates in range.
    options: fixed keyword arguments of the function (config fields override them).
    output_kind: what the function writes (defs/outputs.py); default GeoParquet. A Step
      says its own (Step.output).
    sidecar: fields of `config` that a source's <file>.geoiso.json may set for this step
      (text fields, or dict[str, str] ones). A Step says its own (Step.sidecar).
    """
    paths.check_asset_name(name)
    upstream_name = _asset_name(upstream) if upstream is not None else None
    extra = dict(inputs or {})
    for keyword in extra:
        if not keyword.isidentifier() or keyword in ("source", "output", "row_groups"):
            raise ValueError(f"{name}: bad input keyword {keyword!r}")
    if isinstance(task, Step):
        step = task
    else:
        if not is_qualified(check_task_ref(task)):
            raise ValueError(f"{name}: task {task!r} must name its module: 'package.module:fn'")
        if splittable and not output_kind.joins_parts:
            raise ValueError(f"{name}: parts of {output_kind.name} files cannot be joined")
        step = TaskStep(
            task=task,
            name=name,
            splittable=splittable,
            fixed=dict(options or {}),
            criteria=criteria,
            output=output_kind,
            sidecar=_sidecar_fields(name, config, sidecar),
        )
    kind = step.output
    criteria = criteria_of(name, criteria or step.criteria or kind.default_criteria, kind)
    if upstream is None and not isinstance(task, Step):
        # Inbox files are untrusted: raw_features brings them in through the source jail
        # (spatial/sources.py), and a step of the user's own reads its checked output.
        raise ValueError(f"{name}: a task step needs an upstream asset (raw_features or later)")

    spec = StepSpec(name, step, upstream_name, extra, criteria, config)
    _SPECS[name] = spec

    def compute(context: AssetExecutionContext, spatial_pool: SpatialWorkerPool, config=None):
        # Dagster calls this; everything it does is run_step's, with the spec as argument.
        yield from run_step(context, spatial_pool, spec, dict(config) if config else {})

    _signature(compute, config)
    deps = [upstream] if upstream is not None else []
    deps += [v for v in extra.values() if not isinstance(v, Reference)]
    with warnings.catch_warnings():  # backfill_policy is a Dagster beta parameter
        warnings.simplefilter("ignore", BetaWarning)
        return asset(
            name=name,
            description=description or inspect.cleandoc(_default_description(task)),
            partitions_def=source_files,
            group_name=group_name,
            deps=deps or None,
            output_required=False,
            check_specs=check_specs(name, criteria, kind),
            automation_condition=_AFTER_CHECKS if deps else None,
            kinds={kind.name, step.library},
            pool=POOL,
            backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=BATCH_MAX_FILES),
        )(compute)


# Every geo asset's spec by name, as geo_asset built them in this process: where a step
# that reads another asset's output finds it (its output kind's suffix).
_SPECS: dict[str, "StepSpec"] = {}


@dataclass(frozen=True)
class StepSpec:
    """An asset as geo_asset declared it, in one place: its name, its Step (how it makes
    its file, the kind of file, the catalog facts and sidecar settings it has), what it
    reads (the upstream asset's output, or with none an inbox source; more inputs by
    keyword), what its blocking check judges, and its config class (None: no config)."""

    name: str
    step: Step
    upstream: str | None
    inputs: Mapping[str, Union[AssetRef, "Reference"]]
    criteria: tuple[str, ...]
    config: Optional[type[Config]] = None

    def work(self, key: str, options: Mapping[str, Any]) -> FileWork:
        """The step's work on partition `key`'s file with the config's `options`."""
        if self.upstream:
            source = output_of(self.upstream, key)
        else:
            source = paths.source_path(key)
        return FileWork(
            output=paths.output_path(self.name, key, suffix=self.step.output.suffix),
            source=source,
            step=self.step,
            options=dict(options),
            inputs={k: _input_path(v, key) for k, v in self.inputs.items()},
            criteria=self.criteria,
            from_inbox=self.upstream is None,
        )


def run_step(
    context: AssetExecutionContext,
    pool: SpatialWorkerPool,
    spec: StepSpec,
    options: dict,
) -> Iterator:
    """The step for its files: one (a run of one partition) or a batch (a run over a
    range of partitions), by one driver (defs/batch.py: a file is a batch of one). Bad
    config is refused first, before any work."""
    try:
        spec.step.check(options)
    except BadInputError as exc:
        raise Failure(description=f"Bad config: {exc.cause}", allow_retries=False) from None
    keys = [context.partition_key] if context.has_partition_key else context.partition_keys
    yield from produce_files(context, pool, spec.name, keys, spec.work, options)


def _asset_name(ref: AssetRef) -> str:
    if isinstance(ref, AssetsDefinition):
        return ref.key.to_user_string()
    return paths.check_asset_name(ref)


def spec_of(asset: AssetRef) -> "StepSpec":
    """The spec geo_asset built for `asset` (a geo asset, or its name): its step, what it
    reads, what its check judges; KeyError for any other asset."""
    return _SPECS[_asset_name(asset)]


def sidecar_rules(assets: Iterable[AssetRef]) -> dict[str, SidecarSetting]:
    """What a source's <file>.geoiso.json may set for `assets` (the geo assets among
    them), as their steps declare it (Step.sidecar); ValueError if two claim a name."""
    rules: dict[str, SidecarSetting] = {}
    for ref in assets:
        names = (
            [k.to_user_string() for k in ref.keys] if isinstance(ref, AssetsDefinition) else [ref]
        )
        for spec in (_SPECS[n] for n in names if n in _SPECS):
            for setting, kind in spec.step.sidecar:
                if setting in rules:
                    raise ValueError(
                        f"sidecar setting {setting!r} is claimed by both "
                        f"{rules[setting].asset} and {spec.name}"
                    )
                rules[setting] = SidecarSetting(spec.name, kind, spec.step.check)
    return rules


def output_of(asset: str, key: str) -> Path:
    """Where `asset` publishes partition `key`: with the suffix of its output kind when
    it is a geo asset of this process (GeoParquet otherwise)."""
    spec = _SPECS.get(asset)
    suffix = spec.step.output.suffix if spec else GEOPARQUET.suffix
    return paths.output_path(asset, key, suffix=suffix)


def _input_path(ref: Union[AssetRef, Reference], key: str) -> Path:
    if isinstance(ref, Reference):
        return paths.reference_path(ref.name)
    return output_of(_asset_name(ref), key)


def _sidecar_fields(
    name: str, config: Optional[type[Config]], settings: tuple[str, ...]
) -> tuple[tuple[str, type], ...]:
    """Each sidecar setting with its type, from the config class's field of that name."""
    fields = config.model_fields if isinstance(config, type) and issubclass(config, Config) else {}
    declared = []
    for setting in settings:
        if setting not in fields:
            raise ValueError(f"{name}: sidecar setting {setting!r} is not a field of its config")
        annotation = fields[setting].annotation
        kind = {str: str, dict[str, str]: dict, Optional[str]: str}.get(annotation)
        if kind is None:
            raise ValueError(
                f"{name}: sidecar setting {setting!r} must be a str or dict[str, str] field, "
                f"not {annotation}"
            )
        declared.append((setting, kind))
    return tuple(declared)


def _default_description(task: Union[str, Step]) -> str:
    return f"Made by {task} in an isolated worker." if isinstance(task, str) else ""


def _signature(compute: Callable, config: Optional[type[Config]]) -> None:
    """Give the step the parameters Dagster reads: the pool resource, and `config` typed
    with the Config class when there is one (none at all when there is not)."""
    annotations: dict[str, Any] = {
        "context": AssetExecutionContext,
        "spatial_pool": SpatialWorkerPool,
    }
    if config is not None:
        if not (isinstance(config, type) and issubclass(config, Config)):
            raise TypeError(f"config must be a dagster Config class, not {config!r}")
        annotations["config"] = config
    parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
        for name, annotation in annotations.items()
    ]
    compute.__signature__ = inspect.Signature(parameters)
    compute.__annotations__ = annotations


__all__ = ["Reference", "Step", "geo_asset", "sidecar_rules", "spec_of"]
