"""Running a job in process over a range of partitions, and reading the result of an
in-process Dagster run (`materialize(..., raise_on_error=False)`)."""

from dagster import DagsterEventType


def run_events(result, kind: DagsterEventType) -> list:
    """The run's events of one kind, in order."""
    return [e for e in result.all_events if e.event_type == kind]


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
