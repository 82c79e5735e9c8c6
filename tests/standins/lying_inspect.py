"""Real tasks, except that the read-back miscounts rows: makes a blocking check fail."""

from geoiso_dagster.spatial import tasks as _real
from geoiso_dagster.spatial.tasks import *  # noqa: F403


def inspect(**kwargs) -> dict:
    facts = _real.inspect(**kwargs)
    facts["rows"] += 1
    return facts
