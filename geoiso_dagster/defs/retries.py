"""The retry policy of a file's work (defs/batch.py, which retries it in the step): which
errors are retried (GeoisoError.retryable: transient faults only), 3 attempts, waits
with exponential backoff and jitter kept inside 5-60 s; and the wording of a retry and
of a failure that is not retried."""

import random

from dagster import MetadataValue

from geoiso_dagster.errors import BadInputError, GeoisoError, TaskError

MAX_ATTEMPTS = 3
MIN_WAIT_S = 5.0
MAX_WAIT_S = 60.0


def backoff_seconds(retry_number: int, rng: random.Random | None = None) -> float:
    """Wait before attempt `retry_number + 2`: 5 s doubling, +/-25 % jitter, in [5, 60].

    Dagster's own Backoff.EXPONENTIAL ((2**n - 1) x delay) has no cap and its jitter can
    go below the delay, so the wait is computed here.
    """
    rng = rng or random.Random()
    base = MIN_WAIT_S * 2**retry_number
    return min(MAX_WAIT_S, max(MIN_WAIT_S, base * rng.uniform(0.75, 1.25)))


def describe_failure(exc: GeoisoError) -> tuple[str, dict]:
    """What the user reads about a failure that will not be retried, and its metadata."""
    if isinstance(exc, BadInputError):
        return f"Bad input: {exc}", {"file": MetadataValue.path(exc.path), "cause": exc.cause}
    if isinstance(exc, TaskError):
        return (
            f"Internal error (a bug, not a problem with your data): {exc}",
            {"traceback": MetadataValue.text(exc.traceback)},
        )
    return str(exc), {}


def retrying(exc: GeoisoError, attempt: int, wait: float) -> str:
    """What the run log says when attempt `attempt` failed transiently and another follows."""
    return (
        f"{type(exc).__name__}: {exc}; attempt {attempt} of {MAX_ATTEMPTS}, "
        f"retrying in {wait:.1f} s"
    )


def giving_up(exc: GeoisoError, attempt: int) -> str:
    """The failure of the last attempt at a transient fault."""
    return f"{exc} (attempt {attempt} of {MAX_ATTEMPTS}; giving up)"
