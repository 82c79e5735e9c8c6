"""Running a job in process over a range of partitions, and reading the result of an
in-process Dagster run (`materialize(..., raise_on_error=False)`)."""

import re

from dagster import DagsterEventType

# What the run log says when a file's attempt failed transiently and another follows
# (defs/retries.retrying): the step retries a file's work itself (defs/batch.py).
_RETRY = re.compile(r"attempt (\d+) of \d+, retrying in ([0-9.]+) s")


def run_events(result, kind: DagsterEventType) -> list:
    """The run's events of one kind, in order."""
    return [e for e in result.all_events if e.event_type == kind]


def retries(instance, result) -> list[float]:
    """The wait before each retry of a file's transient fault, as the run's log announced
    them, in order ([] when nothing was retried)."""
    found = (_RETRY.search(entry.user_message or "") for entry in instance.all_logs(result.run_id))
    return [float(match.group(2)) for match in found if match]


def failure_of(result) -> str:
    """The description of the run's one step failure."""
    (failure,) = run_events(result, DagsterEventType.STEP_FAILURE)
    return failure.step_failure_data.user_failure_data.description


def run_batch(job, instance, keys: list[str], run_config: dict):
    """`job` run in process as a batch over partitions `keys[0]...keys[-1]` (the tags a
    sensor's batch or a backfill carries); failures are returned, not raised."""
    return job.execute_in_process(
        instance=instance,
        run_config=run_config,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
        raise_on_error=False,
    )
