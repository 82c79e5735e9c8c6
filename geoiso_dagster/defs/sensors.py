"""The inbox sensor: new or changed files in <data root>/inbox become partitions and
runs of the three assets, in the same tick; small files travel in batches (one run over
a range of partitions), each file keeping its own materializations and checks.

And the remainder sensor: when a batch run fails because some of its files did, it
carries the batch's other files on through the steps they have not done yet.
"""

import graphlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence

from dagster import (
    AssetKey,
    AssetsDefinition,
    DagsterEventType,
    DagsterRunStatus,
    DefaultSensorStatus,
    JobDefinition,
    RunRequest,
    RunStatusSensorContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_status_sensor,
    sensor,
)

from geoiso_dagster import inbox
from geoiso_dagster.defs.assets import BATCH_MAX_FILES
from geoiso_dagster.defs.batch import FAILED_FILES, run_materializations
from geoiso_dagster.defs.partitions import source_files

SETTLE_ENV = "GEOISO_INBOX_SETTLE_S"
DEFAULT_SETTLE_S = 5.0
INTERVAL_ENV = "GEOISO_INBOX_INTERVAL_S"
DEFAULT_INTERVAL_S = 15
# A file at least this large (with its companions) runs alone: it fans out over the
# workers by itself, and its run's time budget is its own.
BATCH_MAX_FILE_BYTES = 32 * 2**20
# A batch carries at most this many bytes of sources.
BATCH_MAX_BYTES = 256 * 2**20
# Runs of the geo steps that may run at once (dagster.yaml: pool geoiso_workers): the
# files of one tick are cut into a multiple of this many batches, so that every slot
# has work until the end.
PARALLEL_RUNS_ENV = "GEOISO_INBOX_PARALLEL_RUNS"
DEFAULT_PARALLEL_RUNS = 2
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
BATCH_TAG = "geoiso/batch_files"
REMAINDER_OF_TAG = "geoiso/remainder_of"
REMAINDER_DEPTH_TAG = "geoiso/remainder_depth"
MAX_REMAINDER_DEPTH = 3
_CURSOR_VERSION = 2


# File times come from a coarse kernel clock (and, on a network file system, from the
# server's): a file written just after a tick read the time may carry a time just before
# it. The mark stays this far behind, and the files changed inside that window are
# remembered by fingerprint, so that the next tick neither loses nor repeats them.
CLOCK_MARGIN_S = 2.0


def _read_cursor(cursor: str | None, now: float) -> tuple[float | None, dict[str, str]]:
    """(mark, recent): files unchanged since `mark` were handled by an earlier tick;
    `recent` holds the fingerprints of files that were ready in the window after it.
    A cursor written at a time later than `now` (the clock was stepped back since) is
    read as none: the mark came from a clock that no longer holds, and a file dropped
    after the step carries a time before it (it was never taken).

    The cursor's size follows the files of the last few seconds, never every file ever
    seen. Any other cursor (none, or one of an earlier version) starts afresh: the tick
    looks at every file once, and Dagster's run keys (name@fingerprint) keep a file that
    was already run from running again."""
    value = json.loads(cursor) if cursor else None
    if isinstance(value, dict) and value.get("version") == _CURSOR_VERSION:
        if float(value.get("at", 0.0)) > now:
            return None, {}
        return float(value["mark"]), dict(value["recent"])
    return None, {}


def _write_cursor(mark: float, recent: dict[str, str], at: float) -> str:
    return json.dumps(
        {"version": _CURSOR_VERSION, "mark": round(mark, 6), "recent": recent, "at": round(at, 3)},
        sort_keys=True,
    )


def _share(files: int, parallel: int) -> int:
    """Files a batch takes when `files` travel together: at most BATCH_MAX_FILES, and
    cut into a multiple of `parallel` batches when there are enough, so that every run
    slot has work until the end."""
    count = min(files, max(math.ceil(files / BATCH_MAX_FILES), parallel))
    if count >= parallel:
        count = math.ceil(count / parallel) * parallel
    return math.ceil(files / max(1, count))


def _chunks(keys: list[str], sizes: dict[str, int], share: int) -> list[list[str]]:
    """Consecutive keys cut into batches of at most `share` files and BATCH_MAX_BYTES."""
    batches: list[list[str]] = []
    for key in keys:
        if (
            not batches
            or len(batches[-1]) >= share
            or sum(sizes[k] for k in batches[-1]) + sizes[key] > BATCH_MAX_BYTES
        ):
            batches.append([])
        batches[-1].append(key)
    return batches


def _consecutive(keys: Iterable[str], position: dict[str, int]) -> list[list[str]]:
    """`keys` as runs of neighbours in the partitions' order (a run covers a range)."""
    runs: list[list[str]] = []
    for key in sorted(keys, key=position.__getitem__):
        if runs and position[key] == position[runs[-1][-1]] + 1:
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs


def _run_key(prefix: str, items: Iterable[str]) -> str:
    return f"{prefix}:" + hashlib.sha256("|".join(items).encode()).hexdigest()[:24]


def plan_runs(ready: list[inbox.InboxFile], known: list[str], parallel: int) -> list[RunRequest]:
    """Run requests for the files of one tick (every one a partition of `known`, in the
    instance's order): a file alone when it is large or its settings differ from every
    neighbour's, else in a batch of neighbouring partitions with the same settings."""
    position = {key: i for i, key in enumerate(known)}
    by_key = {item.key: item for item in ready}
    requests: list[RunRequest] = []
    groups: dict[str, list[str]] = {}
    for item in ready:
        if item.size >= BATCH_MAX_FILE_BYTES:
            groups.setdefault(f"alone:{item.key}", []).append(item.key)
        else:
            groups.setdefault(json.dumps(item.run_config, sort_keys=True), []).append(item.key)
    for keys in groups.values():
        share = _share(len(keys), parallel)
        for run in _consecutive(keys, position):
            for batch in _chunks(run, {k: by_key[k].size for k in run}, share):
                requests.append(_request([by_key[k] for k in batch]))
    requests.sort(key=lambda r: position[r.partition_key or r.tags[RANGE_START]])
    return requests


def _request(batch: list[inbox.InboxFile]) -> RunRequest:
    first = batch[0]
    if len(batch) == 1:
        return RunRequest(
            run_key=first.run_key,
            partition_key=first.key,
            run_config=first.run_config,
            tags={"geoiso/source": first.key, "geoiso/fingerprint": first.fingerprint},
        )
    return RunRequest(
        run_key=_run_key("batch", (item.run_key for item in batch)),
        run_config=first.run_config,
        tags={RANGE_START: first.key, RANGE_END: batch[-1].key, BATCH_TAG: str(len(batch))},
    )


def _parallel_runs() -> int:
    return max(1, int(os.environ.get(PARALLEL_RUNS_ENV, DEFAULT_PARALLEL_RUNS)))


def build_inbox_sensor(
    job: JobDefinition,
    rules: inbox.SidecarRules,
    minimum_interval_seconds: int | None = None,
) -> SensorDefinition:
    """`rules`: what a source's sidecar may set (steps.sidecar_rules of the job's assets)."""
    if minimum_interval_seconds is None:
        minimum_interval_seconds = int(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))

    @sensor(
        name="inbox_sensor",
        job=job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Materializes raw -> reprojected -> dissolved for each new or changed "
        "file in the inbox (settings from an optional <file>.geoiso.json sidecar); small "
        "files in batches, each file its own partition.",
    )
    def inbox_sensor(context: SensorEvaluationContext):
        settle_s = float(os.environ.get(SETTLE_ENV, DEFAULT_SETTLE_S))
        now = time.time()
        since, recent = _read_cursor(context.cursor, now)
        if context.cursor and since is None and '"at"' in context.cursor:
            context.log.warning(
                "inbox: the clock went back since the last tick; looking at every file once "
                "(run keys keep a file already run from running again)"
            )
        found = inbox.scan(settle_s=settle_s, now=now, since=since, seen=recent, rules=rules)
        for name, why in found.refused.items():
            context.log.warning(f"inbox: {name} refused: {why}")
        # Everything that last changed before now - settle has been handled by this tick
        # (run, refused, or waiting for something whose arrival is itself a change).
        mark = max(since or 0.0, now - settle_s - CLOCK_MARGIN_S)
        window = {key: fp for key, (fp, changed) in found.seen_again.items() if changed > mark}
        window.update({item.key: item.fingerprint for item in found.ready if item.changed > mark})
        cursor = _write_cursor(mark, window, now)
        if not found.ready:  # (a file whose fingerprint is in `recent` was not looked at)
            notes = [f"{k}: {why}" for k, why in found.waiting.items()]
            notes += [f"{k}: {why} (refused)" for k, why in found.refused.items()]
            return SensorResult(
                skip_reason=SkipReason(
                    f"nothing new in the inbox ({found.unchanged} unchanged). "
                    + "; ".join(notes)[:4000]
                ),
                cursor=cursor,
            )
        # The new partitions are added here, before the batches are planned: a batch is a
        # range of the instance's order, which a concurrent `geoiso add` could change
        # between this tick and the daemon applying a returned add request.
        order = list(context.instance.get_dynamic_partitions(source_files.name))
        new_keys = sorted({item.key for item in found.ready} - set(order))
        if new_keys:
            context.instance.add_dynamic_partitions(source_files.name, new_keys)
            order = list(context.instance.get_dynamic_partitions(source_files.name))
        return SensorResult(
            run_requests=plan_runs(found.ready, order, _parallel_runs()), cursor=cursor
        )

    return inbox_sensor


def _materialized_in(
    context: RunStatusSensorContext, run_id: str, names: Sequence[str]
) -> dict[str, set[str]]:
    done: dict[str, set[str]] = {name: set() for name in names}
    for record in run_materializations(context.instance, run_id):
        event = record.event_log_entry.dagster_event
        done.setdefault(event.asset_key.to_user_string(), set()).add(event.partition)
    return done


def _failed_files(context: RunStatusSensorContext, run_id: str) -> set[str]:
    """The files a batch step failed on purpose (bad input, failed checks), by key."""
    failed: set[str] = set()
    records = context.instance.get_records_for_run(
        run_id, of_type=DagsterEventType.STEP_FAILURE
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        user = event.step_failure_data.user_failure_data if event else None
        value = user.metadata.get(FAILED_FILES) if user else None
        if value is not None:
            failed.update(value.value)
    return failed


def in_dependency_order(assets: Sequence[AssetsDefinition], group: str) -> list[str]:
    """The names of the assets of `group`, each after the assets it depends on (the
    built-in chain first, then a team's own steps, as they were given)."""
    deps: dict[str, list[str]] = {}
    for definition in assets:
        for spec in definition.specs:
            if spec.group_name == group:
                deps[spec.key.to_user_string()] = [d.asset_key.to_user_string() for d in spec.deps]
    order = graphlib.TopologicalSorter(
        {name: [d for d in ds if d in deps] for name, ds in deps.items()}
    )
    return list(order.static_order())


def build_remainder_sensor(job: JobDefinition, in_order: Sequence[str]) -> SensorDefinition:
    """`in_order`: the job's assets in dependency order (in_dependency_order), the ones a
    remainder run may have to make."""

    @run_status_sensor(
        name="batch_remainder_sensor",
        run_status=DagsterRunStatus.FAILURE,
        monitored_jobs=[job],
        request_job=job,
        minimum_interval_seconds=5,
        default_status=DefaultSensorStatus.RUNNING,
        description="When a batch run fails on some of its files, runs the steps its other "
        "files have not done yet (each failed file stays failed, with its cause).",
    )
    def batch_remainder_sensor(context: RunStatusSensorContext):
        run = context.dagster_run
        start, end = run.tags.get(RANGE_START), run.tags.get(RANGE_END)
        if start is None or end is None:
            return SkipReason(f"run {run.run_id} is not a batch")
        depth = int(run.tags.get(REMAINDER_DEPTH_TAG, "0")) + 1
        if depth > MAX_REMAINDER_DEPTH:
            return SkipReason(f"run {run.run_id} is already remainder {depth - 1}: left as is")
        known = list(context.instance.get_dynamic_partitions(source_files.name))
        if start not in known or end not in known:
            return SkipReason(f"the range {start}...{end} of run {run.run_id} is gone")
        keys = known[known.index(start) : known.index(end) + 1]
        selected = [
            name
            for name in in_order
            if not run.asset_selection or AssetKey(name) in run.asset_selection  # none: all
        ]
        done = _materialized_in(context, run.run_id, selected)
        failed = _failed_files(context, run.run_id)
        todo: dict[tuple[str, ...], list[str]] = {}
        for key in keys:
            if key in failed:
                continue
            # What the run did not make of this file: a step not done, and so every step
            # after it (a step runs only once the steps it reads from are done).
            missing = tuple(name for name in selected if key not in done[name])
            if missing:
                todo.setdefault(missing, []).append(key)
        position = {key: i for i, key in enumerate(known)}
        requests = []
        for assets, pending in todo.items():
            config = {
                "ops": {
                    op: value
                    for op, value in (run.run_config or {}).get("ops", {}).items()
                    if op in assets
                }
            }
            for group in _consecutive(pending, position):
                requests.append(
                    RunRequest(
                        run_key=_run_key(f"remainder-{run.run_id}", [*assets, *group]),
                        asset_selection=[AssetKey(name) for name in assets],
                        run_config=config if config["ops"] else {},
                        tags={
                            RANGE_START: group[0],
                            RANGE_END: group[-1],
                            BATCH_TAG: str(len(group)),
                            REMAINDER_OF_TAG: run.run_id,
                            REMAINDER_DEPTH_TAG: str(depth),
                        },
                    )
                )
        if not requests:
            return SkipReason(f"run {run.run_id}: nothing left for its other files")
        return requests

    return batch_remainder_sensor
