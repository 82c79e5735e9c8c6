"""Where a step's tasks run: one runner for a one-file step and for each file of a batch.

A TaskRunner runs tasks on the run's worker pool and hands everything a person reading the
run log wants to a `log` function: each message a task sends (all of them, before its
result: pool/pool.py), and every STATUS_EVERY_S a line per running task saying how far it
is. Failures are raised as the pool raises them (the project's errors, errors.py); what a
step makes of them (Failure, a retry) is the driver's business (defs/retries.py), the same
for one file and for a batch. Geo-free, and free of Dagster: the benchmarks run the exact
plans of a step on a bare pool with it.
"""

import concurrent.futures
import functools
import queue
import time
from collections.abc import Callable

from geoiso_dagster.pool import TaskResult, WorkerPool

# How often a long step says how far it is (at least every 10 s, the issue asked).
STATUS_EVERY_S = 5.0
_POLL_S = 0.25


def _quiet(message: str) -> None:
    """The log of a runner nobody reads (a benchmark's)."""


class TaskRunner:
    """Runs a plan's tasks (defs/fanout.py) on `pool`, telling `log` what they do."""

    def __init__(self, pool: WorkerPool, log: Callable[[str], None] = _quiet) -> None:
        self.pool, self._log = pool, log
        self.max_workers = pool.settings.max_workers
        self.memory_limit_mb = pool.settings.memory_limit_mb

    def log(self, message: str) -> None:
        self._log(message)

    def run(self, function: str, **kwargs) -> TaskResult:
        """Run one task and wait for it: its TaskResult, or the project's error."""
        return self.run_all([(function, kwargs)])[0]

    def run_all(self, calls: list[tuple[str, dict]]) -> list[TaskResult]:
        """Run tasks side by side and wait for all of them. The first failure cancels the
        others and is raised once none of them runs any more (WorkerPool.cancel), so no
        file of theirs is written after this returns or raises."""
        messages: queue.Queue[dict] = queue.Queue()
        futures = [
            self.pool.submit(
                function, on_progress=functools.partial(_tagged, messages, i), **kwargs
            )
            for i, (function, kwargs) in enumerate(calls)
        ]
        status = Progress([function for function, _ in calls], futures)
        try:
            while not all(f.done() for f in futures):
                concurrent.futures.wait(futures, timeout=_POLL_S, return_when="FIRST_EXCEPTION")
                self._drain(messages, status)
                status.report(self._log)
                if any(f.done() and f.exception() is not None for f in futures):
                    break
            for future in futures:
                if future.done() and future.exception() is not None:
                    raise future.exception()
            results = [f.result() for f in futures]
            self._say_if_unconfined(results)
        finally:
            unfinished = [f for f in futures if not f.done()]
            if unfinished:
                self.pool.cancel(unfinished)
            self._drain(messages, status)
        return results

    def _say_if_unconfined(self, results: list[TaskResult]) -> None:
        """The run log says, for every step, when its tasks ran outside the sandbox."""
        for result in results:
            if result.sandbox.startswith("off"):
                self._log(f"worker sandbox {result.sandbox}: this task ran unconfined")
                return

    def _drain(self, messages: "queue.Queue[dict]", status: "Progress") -> None:
        while True:
            try:
                event = messages.get_nowait()
            except queue.Empty:
                return
            status.saw(event)
            self._log(event.get("message", ""))


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

    def report(self, log: Callable[[str], None]) -> None:
        now = time.monotonic()
        if now - self.last_report < STATUS_EVERY_S:
            return
        self.last_report = now
        elapsed = now - self.started
        for i, future in enumerate(self.futures):
            if not future.done():
                log(status_line(self.functions[i], self.counts.get(i), elapsed))


def status_line(function: str, facts: dict | None, elapsed: float) -> str:
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


def _tagged(messages: "queue.Queue[dict]", index: int, event: dict) -> None:
    """Queue a task's message, tagged with the task's place among the calls."""
    messages.put({**event, "index": index})
