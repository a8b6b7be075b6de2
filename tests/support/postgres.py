"""The PostgreSQL the outbox tests use, and the tables they make in it.

The server is ``EPQ_TEST_POSTGRES_URL``, else the one on 127.0.0.1:5432 (database ``test``, user
``postgres``, trust auth): a shared server, so the suite only touches what it creates. Each test
process makes a schema of its own (``epq_test_<pid>_<random>``) when its first test needs one, a
table per test inside it, and drops the schema (with everything in it) when the process ends.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import psycopg

from epq.outbox import schema_sql

POSTGRES_URL = os.environ.get("EPQ_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/test"


class Schema:
    """This process's schema, made on first use, dropped by :meth:`close`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"epq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.created = False

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, connect_timeout=3, **kwargs)

    def new_table(self) -> str:
        """A new outbox table (``schema.outbox_<random>``), created by epq's own SQL."""
        table = f"{self.name}.outbox_{uuid.uuid4().hex[:10]}"
        with self.connect(autocommit=True) as connection:
            connection.execute(schema_sql(table))
        self.created = True
        return table

    def drop_table(self, table: str) -> None:
        with self.connect(autocommit=True) as connection:
            connection.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
            connection.execute(f"DROP FUNCTION IF EXISTS {table}_notify()")

    def close(self) -> None:
        if self.created:
            with self.connect(autocommit=True) as connection:
                connection.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")
            self.created = False


def rows(url: str, table: str) -> list[tuple[Any, ...]]:
    """Every row of an outbox table, oldest first."""
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute(
            f"SELECT job_id, kind, payload, unique_key FROM {table} ORDER BY id"
        ).fetchall()
