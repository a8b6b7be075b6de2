"""The application's side of the outbox tests: its database transactions, through psycopg 3 or
through SQLAlchemy 2 (a ``Session``, or a ``Connection``), and a table of its own it writes to
in the same transaction as the enqueue ("create the endpoint, then index it")."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from tests.support.postgres import POSTGRES_URL, Schema

#: The ways an application hands epq its transaction.
FORMS = ("psycopg", "sqlalchemy-session", "sqlalchemy-connection")

_engines: dict[str, sqlalchemy.Engine] = {}


def engine() -> sqlalchemy.Engine:
    """An SQLAlchemy engine on the test database, on psycopg 3 (no pool: nothing left open)."""
    url = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    if url not in _engines:
        _engines[url] = sqlalchemy.create_engine(url, poolclass=NullPool)
    return _engines[url]


@dataclass
class Tx:
    """An open transaction of the application: ``tx`` is what it passes to epq."""

    tx: Any
    form: str
    endpoints: str  # the application's own table

    def create_endpoint(self) -> str:
        """The application's own write: a new endpoint row, in this transaction."""
        endpoint_id = str(uuid.uuid4())
        statement = f"INSERT INTO {self.endpoints} (id) VALUES (%s)"
        if self.form == "psycopg":
            self.tx.execute(statement, (endpoint_id,))
        else:
            self.tx.execute(sqlalchemy.text(statement.replace("%s", ":id")), {"id": endpoint_id})
        return endpoint_id

    def commit(self) -> None:
        self.tx.commit()

    def rollback(self) -> None:
        self.tx.rollback()


class AppDb:
    """Transactions of one form on the test database."""

    def __init__(self, form: str, schema: Schema) -> None:
        self.form = form
        self.schema = schema
        self.endpoints = f"{schema.name}.endpoints"
        with schema.connect(autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema.name}")
            connection.execute(f"CREATE TABLE IF NOT EXISTS {self.endpoints} (id uuid PRIMARY KEY)")
        schema.created = True

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A transaction, open until the block ends: the test commits or rolls it back (left
        open, it is rolled back)."""
        if self.form == "psycopg":
            with psycopg.connect(POSTGRES_URL) as connection:
                yield Tx(connection, self.form, self.endpoints)
                connection.rollback()
        elif self.form == "sqlalchemy-session":
            with Session(engine()) as session:
                yield Tx(session, self.form, self.endpoints)
                session.rollback()
        else:
            with engine().connect() as connection:
                connection.begin()
                yield Tx(connection, self.form, self.endpoints)
                connection.rollback()

    def endpoint_exists(self, endpoint_id: str) -> bool:
        with self.schema.connect(autocommit=True) as connection:
            row = connection.execute(f"SELECT 1 FROM {self.endpoints} WHERE id = %s", (endpoint_id,))
            return row.fetchone() is not None
