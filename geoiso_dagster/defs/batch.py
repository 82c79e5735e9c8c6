"""The one driver of a step over its files: one file (a run of one partition) is a batch
of one; a batch is a run over a range of partitions.

Each file goes through the envelope (defs/envelope.py), side by side on the run's
workers: its transient faults are retried for it alone, in the step (3 attempts, 5-60 s
apart: a Dagster retry would run every file of a batch again), its bad input or failed
checks fail it alone. Files that passed are published and get their own
materialization, metadata (with the attempts they took) and check results (per
partition). When every file passed, the step ends as one materialization, so the next
step runs. When some failed, the step records the good files, then fails naming each bad
one with its cause (not retried by Dagster); the remainder sensor (defs/sensors.py)
carries the good files of a batch on through the next steps.
"""

import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AssetCheckEvaluation,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    DagsterEventType,
    DagsterInstance,
    EventLogRecord,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,  # not exported; what a check points at
)

from geoiso_dagster import dataroot
from geoiso_dagster.defs import reconcile
from geoiso_dagster.defs.envelope import (
    FileWork,
    Judged,
    metadata,
    stage_and_judge,
)
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.defs.retries import (
    MAX_ATTEMPTS,
    backoff_seconds,
    describe_failure,
    giving_up,
    retrying,
)
from geoiso_dagster.defs.runner import TaskRunner
from geoiso_dagster.errors import BadInputError, GeoisoError
from geoiso_dagster.fsutil import temp_path_for
from geoiso_dagster.pool import WorkerPool

# Metadata key of a batch step's failure: {partition key: cause}, read by the sensor
# that carries the other files of the batch on.
FAILED_FILES = "failed_files"
_MESSAGE_FILES = 20  # files named in the failure's text (all of them are in its metadata)
_LOG_EVERY_S = 0.25  # how often a file alone's messages are written to the run log
# A batch's messages go out together, one log event this often: each event is a write to
# the instance's database (about 30 ms on SQLite), which a batch of small files would
# otherwise pay three or more times a file (benchmarks/small_files.py counts them).
_BATCH_LOG_EVERY_S = 5.0


@dataclass
class Outcome:
    key: str
    work: FileWork | None = None
    staged: Path | None = None
    judged: Judged | None = None
    error: str | None = None
    # The failure's metadata (retries.describe_failure: the file and cause, a traceback).
    details: dict = field(default_factory=dict)
    attempts: int = 0

    @property
    def passed(self) -> bool:
        return self.error is None and self.judged is not None and self.judged.passed

    @property
    def cause(self) -> str:
        if self.error is not None:
            return self.error
        failed = self.judged.failed_checks() if self.judged else []
        return f"blocking checks failed: {', '.join(failed)}"


class _Lines:
    """What the files' threads say, queued for Dagster's thread to write: info lines (a
    batch's go out together, one message every few seconds) and warnings (each its own,
    at once)."""

    def __init__(self, together: bool):
        self.together = together
        self.every = _BATCH_LOG_EVERY_S if together else _LOG_EVERY_S
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self._written = time.monotonic()
        self._warned = threading.Event()

    def info(self, prefix: str, message: str) -> None:
        self._queue.put(("info", f"{prefix}{message}"))

    def warning(self, prefix: str, message: str) -> None:
        self._queue.put(("warning", f"{prefix}{message}"))
        self._warned.set()

    def write(self, context: AssetExecutionContext, *, now: bool = False) -> None:
        """Everything queued, if it is time (or `now`, or a warning waits)."""
        if not (now or self._warned.is_set() or time.monotonic() - self._written >= self.every):
            return
        self._warned.clear()
        self._written = time.monotonic()
        infos: list[str] = []
        while True:
            try:
                level, message = self._queue.get_nowait()
            except queue.Empty:
                break
            if level == "info":
                infos.append(message)
                continue
            self._infos(context, infos)
            infos = []
            context.log.warning(message)
        self._infos(context, infos)

    def _infos(self, context: AssetExecutionContext, infos: list[str]) -> None:
        for message in ["\n".join(infos)] if self.together and infos else infos:
            context.log.info(message)


@dataclass
class Tried:
    """How `_retried` ended: the value of the attempt that succeeded, or the failure."""

    value: object = None
    attempts: int = 0
    error: str | None = None
    details: dict = field(default_factory=dict)


def _retried(
    attempt_once: Callable[[int], object],
    warn: Callable[[str], None],
    stop: threading.Event,
) -> Tried:
    """`attempt_once(n)` until it returns, by the project's one retry policy
    (defs/retries.py): a transient GeoisoError is tried again after a backoff (announced
    by `warn`), at most MAX_ATTEMPTS times, never once `stop` is set; anything else ends
    it at once. Each attempt cleans up after itself."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return Tried(attempt_once(attempt), attempt)
        except GeoisoError as exc:
            if not exc.retryable:
                return Tried(None, attempt, *describe_failure(exc))
            if attempt == MAX_ATTEMPTS or stop.is_set():
                return Tried(None, attempt, giving_up(exc, attempt))
            wait = backoff_seconds(attempt - 1)
            warn(retrying(exc, attempt, wait))
            stop.wait(wait)
    raise AssertionError("unreachable")


def _one_file(
    lines: _Lines,
    pool: WorkerPool,
    asset_name: str,
    key: str,
    plan: Callable[[str, Mapping], FileWork],
    options: Mapping,
    stop: threading.Event,
    prefix: str,
) -> Outcome:
    # A batch's lines are named by their file; a file alone's need no name.
    runner = TaskRunner(pool, functools.partial(lines.info, prefix))
    outcome = Outcome(key)
    try:
        outcome.work = plan(key, options)
    except BadInputError as exc:
        outcome.error, outcome.details = describe_failure(exc)
        return outcome
    attempt_once = functools.partial(
        _attempt, runner=runner, asset_name=asset_name, work=outcome.work
    )
    tried = _retried(attempt_once, functools.partial(lines.warning, prefix), stop)
    outcome.attempts, outcome.error, outcome.details = tried.attempts, tried.error, tried.details
    if tried.value is not None:
        staged, outcome.judged = tried.value
        outcome.staged = staged if outcome.judged.passed else None
    return outcome


def _attempt(
    attempt: int, *, runner: TaskRunner, asset_name: str, work: FileWork
) -> tuple[Path, Judged]:
    """One attempt at a file: staged and judged; a failed one leaves nothing staged."""
    root = dataroot.root()
    staged = temp_path_for(work.output)
    try:
        if attempt == 1:  # a failed attempt sweeps after itself (_discard)
            root.sweep(work.output)
        judged = stage_and_judge(runner, asset_name, work, staged)
    except BaseException:
        _discard(root, staged, work.output)
        raise
    if not judged.passed:
        _discard(root, staged, work.output)
    return staged, judged


def _discard(root: "dataroot.Root", staged: Path, output: Path) -> None:
    """A failed attempt's staged output, and whatever its killed workers left beside it."""
    root.discard(staged)
    with contextlib.suppress(GeoisoError):  # the attempt's own error matters more
        root.sweep(output)


def _run_files(
    context: AssetExecutionContext,
    pool: SpatialWorkerPool,
    asset_name: str,
    keys: Sequence[str],
    plan: Callable[[str, Mapping], FileWork],
    options: Mapping,
) -> list[Outcome]:
    """Every file through the envelope, as many at once as the pool has workers. What
    each file's tasks say reaches the run log (named by the file in a batch): the files'
    threads queue it, and this thread, Dagster's, writes it: a file alone's lines as they
    come, a batch's every few seconds as one message of their lines."""
    stop = threading.Event()
    lines = _Lines(together=len(keys) > 1)
    outcomes: dict[str, Outcome] = {}
    threads = ThreadPoolExecutor(max(1, pool.max_workers), thread_name_prefix="geoiso-file")
    try:
        pending = {
            threads.submit(
                _one_file,
                lines,
                pool.pool,
                asset_name,
                key,
                plan,
                options,
                stop,
                _prefix(key, keys),
            )
            for key in keys
        }
        while pending:
            done, pending = wait(pending, timeout=_LOG_EVERY_S, return_when=FIRST_COMPLETED)
            finished = [future.result() for future in done]
            # A failed file's lines go out before its error, which follows them at once.
            lines.write(context, now=any(not o.passed for o in finished))
            for outcome in finished:
                outcomes[outcome.key] = outcome
                if not outcome.passed:
                    context.log.error(f"{asset_name} {outcome.key}: {outcome.cause}")
    except BaseException:
        stop.set()  # interrupted (run terminated) or a bug: no file waits out a backoff
        threads.shutdown(wait=False, cancel_futures=True)
        for outcome in outcomes.values():
            if outcome.staged is not None:
                dataroot.root().discard(outcome.staged)
        raise
    threads.shutdown()
    lines.write(context, now=True)
    return [outcomes[k] for k in keys]


def _prefix(key: str, keys: Sequence[str]) -> str:
    return f"{key}: " if len(keys) > 1 else ""


def _add_partition_metadata(
    context: AssetExecutionContext, asset_key: AssetKey, key: str, entry: dict
) -> None:
    """context.add_asset_metadata(entry, partition_key=key), without its check that `key`
    is in the run's range: that check reads every partition key of the instance, once per
    call, a cost that grows with the partitions. The keys here are the run's own."""
    step = context.get_step_execution_context()
    accumulator = getattr(step, "_metadata_accumulator", None)
    if accumulator is None:  # a Dagster without it: the public, slower call
        context.add_asset_metadata(entry, partition_key=key)
        return
    step._metadata_accumulator = accumulator.with_additional_asset_metadata(
        asset_key=asset_key, metadata=entry, partition_key=key
    )


def run_materializations(instance: DagsterInstance, run_id: str) -> Iterator[EventLogRecord]:
    """Every partitioned asset materialization the run recorded, page by page."""
    cursor = None
    while True:
        page = instance.get_records_for_run(
            run_id, cursor=cursor, of_type=DagsterEventType.ASSET_MATERIALIZATION
        )
        for record in page.records:
            event = record.event_log_entry.dagster_event
            if event is not None and event.asset_key is not None and event.partition:
                yield record
        if not page.has_more:
            return
        cursor = page.cursor


def _targets(
    context: AssetExecutionContext, asset_key: AssetKey
) -> dict[str, AssetCheckEvaluationTargetMaterializationData]:
    """The materialization of each partition of `asset_key` this run recorded."""
    found = {}
    for record in run_materializations(context.instance, context.run.run_id):
        event = record.event_log_entry.dagster_event
        if event.asset_key == asset_key:
            found[event.partition] = AssetCheckEvaluationTargetMaterializationData(
                storage_id=record.storage_id,
                run_id=context.run.run_id,
                timestamp=record.event_log_entry.timestamp,
            )
    return found


def _publish(context: AssetExecutionContext, asset_name: str, o: Outcome) -> str | None:
    """Publish a file that passed, by the same retry policy as its work; a file that
    cannot be published fails alone, naming why, and keeps its previous output. Returns
    the line that says how long a bucket took, if it did."""
    root = dataroot.root()
    tried = _retried(
        functools.partial(_publish_once, root=root, o=o),
        functools.partial(_warn_publishing, context, o.key),
        threading.Event(),
    )
    if tried.error is not None:
        _discard(root, o.staged, o.work.output)
        o.judged = None  # its checks passed on a file that is not published
        o.error, o.details = tried.error, tried.details
        context.log.error(f"{asset_name} {o.key}: {o.error}")
        return None
    seconds = tried.value
    return f"{asset_name}: published to the bucket in {seconds:.1f} s: {o.key}" if seconds else None


def _publish_once(attempt: int, *, root: "dataroot.Root", o: Outcome) -> float:
    return root.publish(o.staged, o.work.output)


def _warn_publishing(context: AssetExecutionContext, key: str, line: str) -> None:
    context.log.warning(f"{key}: publishing: {line}")


def _catalog(o: Outcome) -> dict:
    return {
        **metadata(o.judged.result, o.work),
        "attempts": MetadataValue.int(o.attempts),
        **reconcile.stamp_entry(o.work.output),
    }


def _files_read_or_written(
    keys: Sequence[str], plan: Callable[[str, Mapping], FileWork], options: Mapping
) -> list:
    """Each key's own output and the outputs of other assets it reads, as the catalog
    knows them (reconcile.files_of)."""
    outputs = []
    for key in keys:
        try:
            work = plan(key, options)
        except GeoisoError:
            continue  # the file's own work names what is wrong
        outputs += [work.output, *([] if work.from_inbox else [work.source]), *work.inputs.values()]
    return reconcile.files_of(outputs)


def _can_record(context: AssetExecutionContext, line: str) -> None:
    """Write `line` to the catalog before publishing: an instance that cannot record (its
    disk full) stops the step here, naming why, with nothing published."""
    try:
        context.log.info(line)
    except Exception as exc:  # noqa: BLE001 - whatever the instance's storage raised
        first = " ".join(str(exc).split())[:300]
        raise Failure(
            description=f"the Dagster instance cannot record events ({type(exc).__name__}: "
            f"{first}); nothing was published: free its storage and run again",
            allow_retries=False,
        ) from None


def produce_files(
    context: AssetExecutionContext,
    pool: SpatialWorkerPool,
    asset_name: str,
    keys: Sequence[str],
    plan: Callable[[str, Mapping], FileWork],
    options: Mapping,
) -> Iterator:
    """The step's files (partition `keys`, one or more) through the envelope; each
    file's work is `plan(key, options)` (StepSpec.work)."""
    started = time.monotonic()
    reconcile.reconcile(context, _files_read_or_written(keys, plan, options))
    outcomes = _run_files(context, pool, asset_name, keys, plan, options)
    good = [o for o in outcomes if o.passed]
    bad = [o for o in outcomes if not o.passed]
    asset_key = AssetKey(asset_name)
    if good:  # the step's one summary line, written before anything is published
        _can_record(
            context,
            f"{asset_name}: {len(good)} of {len(keys)} files made in "
            f"{time.monotonic() - started:.1f} s; publishing them",
        )
    # In this thread, together, so that the catalog follows at once; a batch's bucket
    # timings in one message, like its other lines.
    if said := [line for o in good if (line := _publish(context, asset_name, o))]:
        for message in ["\n".join(said)] if len(keys) > 1 else said:
            context.log.info(message)
    good = [o for o in outcomes if o.passed]
    bad = [o for o in outcomes if not o.passed]
    if not bad:
        for o in good:
            _add_partition_metadata(context, asset_key, o.key, _catalog(o))
        yield MaterializeResult()
    else:
        for o in good:
            yield AssetMaterialization(asset_key=asset_key, partition=o.key, metadata=_catalog(o))
    targets = _targets(context, asset_key)
    for o in outcomes:
        for check in o.judged.checks if o.judged else []:
            yield AssetCheckEvaluation(
                asset_key=asset_key,
                check_name=str(check.check_name),
                passed=check.passed,
                metadata=check.metadata,
                target_materialization_data=targets.get(o.key),
                severity=check.severity,
                blocking=True,
                partition=o.key,
            )
    if not bad:  # the step's check outputs (the results are the per-file ones above)
        for check_key in context.selected_asset_check_keys:
            name = context.assets_def.get_output_name_for_asset_check_key(check_key)
            yield Output(None, output_name=name)
    if not good:
        context.log.info(
            f"{asset_name}: 0 of {len(keys)} files made in {time.monotonic() - started:.1f} s"
        )
    if len(keys) == 1 and bad:  # a file alone: its own cause, as it is
        (o,) = bad
        raise Failure(
            description=o.cause,
            metadata={**o.details, FAILED_FILES: MetadataValue.json({o.key: o.cause})},
            allow_retries=False,
        )
    if bad:
        named = "; ".join(f"{o.key}: {o.cause}" for o in bad[:_MESSAGE_FILES])
        more = f"; and {len(bad) - _MESSAGE_FILES} more" if len(bad) > _MESSAGE_FILES else ""
        raise Failure(
            description=f"{len(bad)} of {len(keys)} files failed in {asset_name} (each alone; "
            f"the other {len(good)} were published and go on): {named}{more}",
            metadata={FAILED_FILES: MetadataValue.json({o.key: o.cause for o in bad})},
            allow_retries=False,
        )
