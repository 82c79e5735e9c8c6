"""The inbox sensor: a new or changed file in <data root>/inbox becomes a partition
and one run of the three assets, in the same tick."""

import json
import os

from dagster import (
    DefaultSensorStatus,
    JobDefinition,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from geoiso_dagster import inbox
from geoiso_dagster.defs.partitions import source_files

SETTLE_ENV = "GEOISO_INBOX_SETTLE_S"
DEFAULT_SETTLE_S = 5.0
INTERVAL_ENV = "GEOISO_INBOX_INTERVAL_S"
DEFAULT_INTERVAL_S = 15


def build_inbox_sensor(
    job: JobDefinition, minimum_interval_seconds: int | None = None
) -> SensorDefinition:
    if minimum_interval_seconds is None:
        minimum_interval_seconds = int(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))

    @sensor(
        name="inbox_sensor",
        job=job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Materializes raw -> reprojected -> dissolved for each new or changed "
        "file in the inbox (settings from an optional <file>.geoiso.json sidecar).",
    )
    def inbox_sensor(context: SensorEvaluationContext):
        settle_s = float(os.environ.get(SETTLE_ENV, DEFAULT_SETTLE_S))
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        found = inbox.scan(settle_s=settle_s)
        for name, why in found.refused.items():
            if seen.get(name) != f"refused:{why}":
                context.log.warning(f"inbox: {name} refused: {why}")
                seen[name] = f"refused:{why}"
        requests, new_keys = [], []
        for item in found.ready:
            if seen.get(item.key) == item.fingerprint:
                continue
            if not context.instance.has_dynamic_partition(source_files.name, item.key):
                new_keys.append(item.key)
            requests.append(
                RunRequest(
                    run_key=item.run_key,
                    partition_key=item.key,
                    run_config=item.run_config,
                    tags={"geoiso/source": item.key, "geoiso/fingerprint": item.fingerprint},
                )
            )
            seen[item.key] = item.fingerprint
        if not requests and not new_keys:
            waiting = "; ".join(f"{k}: {why}" for k, why in found.waiting.items())
            return SensorResult(
                skip_reason=SkipReason(f"nothing new in the inbox. {waiting}".strip()),
                cursor=json.dumps(seen, sort_keys=True),
            )
        return SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[source_files.build_add_request(new_keys)]
            if new_keys
            else [],
            cursor=json.dumps(seen, sort_keys=True),
        )

    return inbox_sensor
