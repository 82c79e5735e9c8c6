"""From pool outcomes to Dagster: Failure for bad input, RetryRequested for transient
faults, with exponential backoff and jitter kept inside 5-60 s."""

import concurrent.futures
import queue
import random
import time

from dagster import Failure, MetadataValue, OpExecutionContext, RetryRequested

from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.errors import BadInputError, GeoisoError, TaskError
from geoiso_dagster.pool import TaskResult

MAX_ATTEMPTS = 3
MIN_WAIT_S = 5.0
MAX_WAIT_S = 60.0
# How often a long step says how far it is (the issue asks for at least every 10 s).
STATUS_EVERY_S = 5.0


def backoff_seconds(retry_number: int, rng: random.Random | None = None) -> float:
    """Wait before attempt `retry_number + 2`: 5 s doubling, +/-25 % jitter, in [5, 60].

    Dagster's own Backoff.EXPONENTIAL ((2**n - 1) x delay) has no cap and its jitter can
    go below the delay, so the wait is computed here and given to RetryRequested.
    """
    rng = rng or random.Random()
    base = MIN_WAIT_S * 2**retry_number
    return min(MAX_WAIT_S, max(MIN_WAIT_S, base * rng.uniform(0.75, 1.25)))


def run_task(context: OpExecutionContext, pool: SpatialWorkerPool, function: str, **kwargs):
    """Run a worker task for a step; progress goes to the run's log as it happens."""
    return run_tasks(context, pool, [(function, kwargs)])[0]


def run_tasks(
    context: OpExecutionContext, pool: SpatialWorkerPool, calls: list[tuple[str, dict]]
) -> list[TaskResult]:
    """Run tasks side by side on the pool's workers and wait for all of them. The first
    failure cancels the others (killing their workers) and is raised as run_task would:
    Failure for bad input, RetryRequested with backoff for transient faults."""
    messages: queue.Queue[dict] = queue.Queue()
    futures = [
        pool.pool.submit(fn, on_progress=lambda e, i=i: messages.put({**e, "index": i}), **kwargs)
        for i, (fn, kwargs) in enumerate(calls)
    ]
    status = Progress([fn for fn, _ in calls], futures)
    try:
        while not all(f.done() for f in futures):
            concurrent.futures.wait(futures, timeout=0.25, return_when="FIRST_EXCEPTION")
            _drain(context, messages, status)
            status.report(context)
            if any(f.done() and f.exception() is not None for f in futures):
                break
        for future in futures:
            if future.done() and future.exception() is not None:
                raise_for(context, future.exception())
        results = [f.result() for f in futures]
    finally:
        for future in futures:
            future.cancel()
    _drain(context, messages, status)
    return results


def describe_failure(exc: GeoisoError) -> tuple[str, dict]:
    """What the user reads about a failure that will not be retried, and its metadata:
    one wording for a single-file step and for a file of a batch."""
    if isinstance(exc, BadInputError):
        return f"Bad input: {exc}", {"file": MetadataValue.path(exc.path), "cause": exc.cause}
    if isinstance(exc, TaskError):
        return (
            f"Internal error (a bug, not a problem with your data): {exc}",
            {"traceback": MetadataValue.text(exc.traceback)},
        )
    return str(exc), {}


def raise_for(context: OpExecutionContext, exc: BaseException) -> None:
    """Raise what a step raises for `exc`: Failure for what is not retried, RetryRequested
    with backoff for transient faults (until the last attempt), other exceptions as they are."""
    if not isinstance(exc, GeoisoError):
        raise exc
    if not exc.retryable:
        description, metadata = describe_failure(exc)
        raise Failure(description=description, metadata=metadata, allow_retries=False) from None
    attempt = context.retry_number + 1
    if attempt >= MAX_ATTEMPTS:
        raise Failure(description=giving_up(exc, attempt), allow_retries=False) from None
    wait = backoff_seconds(context.retry_number)
    context.log.warning(retrying(exc, attempt, wait))
    raise RetryRequested(max_retries=MAX_ATTEMPTS - 1, seconds_to_wait=wait) from exc


def retrying(exc: GeoisoError, attempt: int, wait: float) -> str:
    """What the run log says when attempt `attempt` failed transiently and another follows."""
    return (
        f"{type(exc).__name__}: {exc}; attempt {attempt} of {MAX_ATTEMPTS}, "
        f"retrying in {wait:.1f} s"
    )


def giving_up(exc: GeoisoError, attempt: int) -> str:
    """The failure of the last attempt at a transient fault."""
    return f"{exc} (attempt {attempt} of {MAX_ATTEMPTS}; giving up)"


class Progress:
    """How far each running task is, for a person reading the run log: every
    STATUS_EVERY_S, one line per running task with what it last reported (done of total,
    its unit), its rate and the time it expects to need; or how long it has worked, when
    it reported no counts."""

    def __init__(self, functions: list[str], futures: list) -> None:
        self.functions, self.futures = functions, futures
        self.started = time.monotonic()
        self.last_report = self.started
        self.counts: dict[int, dict] = {}  # task index -> its last progress facts with counts

    def saw(self, event: dict) -> None:
        if "done" in event and "index" in event:
            self.counts[event["index"]] = event

    def report(self, context: OpExecutionContext) -> None:
        now = time.monotonic()
        if now - self.last_report < STATUS_EVERY_S:
            return
        self.last_report = now
        elapsed = now - self.started
        for i, future in enumerate(self.futures):
            if not future.done():
                context.log.info(_status_line(self.functions[i], self.counts.get(i), elapsed))


def _status_line(function: str, facts: dict | None, elapsed: float) -> str:
    if not facts:
        return f"{function}: working for {elapsed:.0f} s"
    done, total, unit = int(facts["done"]), facts.get("total"), facts.get("unit", "rows")
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"{function}: {done:,} {unit}"
    if total:
        left = (int(total) - done) / rate if rate > 0 else float("inf")
        eta = f"about {left:.0f} s left" if left != float("inf") else "no estimate yet"
        line += f" of {int(total):,} ({100 * done / int(total):.0f} %)"
        return f"{line}, {rate:,.0f} {unit}/s, {eta} (after {elapsed:.0f} s)"
    return f"{line} so far, {rate:,.0f} {unit}/s (after {elapsed:.0f} s)"


def _drain(context: OpExecutionContext, messages: "queue.Queue[dict]", status: Progress) -> None:
    while True:
        try:
            event = messages.get_nowait()
        except queue.Empty:
            return
        status.saw(event)
        context.log.info(event.get("message", ""))
