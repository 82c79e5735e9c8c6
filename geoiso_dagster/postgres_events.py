"""The deployment's event log: dagster-postgres', with a pool of connections.

dagster-postgres opens a new connection for every statement outside the webserver (its
engine has no pool), and storing one event takes three: 35 ms an event here against a
local PostgreSQL 15 (scram-sha-256 authentication and a backend process each), where
SQLite takes 13 ms. A batch run of small files writes about nine events a file, so the
connections, not the geo work, set the pace. This class keeps one connection per process
(up to ten more while busy), checked with a ping before each use, so a Postgres restart
costs a reconnect and never a dead socket: 3.5 ms an event (benchmarks.small_files
--deployment). No geo imports: every Dagster process of the deployment loads it.
"""

from collections.abc import Mapping
from typing import Any

from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.utils import (
    create_pg_engine,
    get_token_provider_from_config,
    pg_url_from_config,
)

POOL_SIZE = 1
MAX_OVERFLOW = 10
RECYCLE_S = 600


class PooledPostgresEventLogStorage(PostgresEventLogStorage):
    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, **kwargs):
        super().__init__(postgres_url, should_autocreate_tables, **kwargs)
        self._engine.dispose()
        self._engine = create_pg_engine(
            self.postgres_url,
            self._token_provider,
            isolation_level="AUTOCOMMIT",
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
            pool_pre_ping=True,
            pool_recycle=RECYCLE_S,
        )

    @classmethod
    def from_config_value(
        cls, inst_data, config_value: Mapping[str, Any]
    ) -> "PooledPostgresEventLogStorage":
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )
