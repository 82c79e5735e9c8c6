"""The deployment's event log on a real PostgreSQL: one pooled connection per process
instead of three new ones per event, and a Postgres restart costs a reconnect, never an
error."""

import os
from unittest import mock

import sqlalchemy
from dagster import DagsterInstance

from geoiso_dagster.postgres_events import PooledPostgresEventLogStorage
from tests.harness.deploy import postgres_instance_yaml
from tests.harness.live import report_check_events


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
            report_check_events(instance, "probe", "a", 5)
            connects.clear()
            report_check_events(instance, "probe", "b", 50)
            assert len(connects) == 0  # dagster-postgres alone: 150 new connections
            postgres.stop()
            postgres.start()
            report_check_events(
                instance, "probe", "c", 5
            )  # the pooled connection is dead: pinged, replaced
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
