"""Reading the result of an in-process Dagster run (`materialize(..., raise_on_error=False)`)."""

from dagster import DagsterEventType


def run_events(result, kind: DagsterEventType) -> list:
    """The run's events of one kind, in order."""
    return [e for e in result.all_events if e.event_type == kind]


def failure_of(result) -> str:
    """The description of the run's one step failure."""
    (failure,) = run_events(result, DagsterEventType.STEP_FAILURE)
    return failure.step_failure_data.user_failure_data.description
