"""The deployment's event log on a real PostgreSQL: one pooled connection per process
instead of three new ones per event, and a Postgres restart costs a reconnect, never an
error."""

import os
from unittest import mock

import sqlalchemy
from dagster import AssetCheckEvaluation, AssetKey, DagsterInstance

from geoiso_dagster.storage import PooledPostgresEventLogStorage
from tests.deploy import postgres_instance_yaml


def _report(instance: DagsterInstance, prefix: str, n: int) -> None:
    for i in range(n):
        instance.report_runless_asset_event(
            AssetCheckEvaluation(
                asset_key=AssetKey("probe"),
                check_name="probe",
                passed=True,
                partition=f"{prefix}{i}",
            )
        )


def test_events_reuse_one_connection_and_survive_a_postgres_restart(postgres, tmp_path):
    (tmp_path / "dagster.yaml").write_text(postgres_instance_yaml())
    env = {"DAGSTER_HOME": str(tmp_path), **postgres.database("t_storage")}
    connects = []

    def count(*_):
        connects.append(1)

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", count)
    try:
        with mock.patch.dict(os.environ, env), DagsterInstance.get() as instance:
            assert isinstance(instance.event_log_storage, PooledPostgresEventLogStorage)
            _report(instance, "a", 5)
            connects.clear()
            _report(instance, "b", 50)
            assert len(connects) == 0  # dagster-postgres alone: 150 new connections
            postgres.stop()
            postgres.start()
            _report(instance, "c", 5)  # the pooled connection is dead: pinged, replaced
            assert len(connects) >= 1
            with instance.event_log_storage.index_connection() as connection:
                stored = connection.execute(
                    sqlalchemy.text(
                        "SELECT count(*) FROM event_logs "
                        "WHERE dagster_event_type = 'ASSET_CHECK_EVALUATION'"
                    )
                ).scalar()
            assert stored == 60  # none lost to the restart
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "connect", count)
