"""The application's database, as epq reaches it: the transaction a caller passes as ``tx=``,
and the connections epq opens itself (a relay's, and the one ``get_job`` reads pending jobs with).

``tx`` may be a psycopg 3 connection, or an SQLAlchemy 2 ``Session`` or ``Connection`` (on
psycopg 3, or psycopg2). epq writes with the DBAPI connection underneath, in the transaction
the application has open, so it imports neither library for that (``sqlalchemy`` is never
imported by epq); its own connections are psycopg 3, imported by name (:data:`PSYCOPG`) when
the first one is opened: only with ``epq[postgres]`` installed and an ``EPQ_OUTBOX_URL`` set.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from ..backends.urls import mask_url
from ..errors import BrokerUnavailable, ConfigurationError, InvalidRequest

#: The driver of the connections epq opens itself, imported on first use.
PSYCOPG = "psycopg"

#: ``transaction_status`` of a libpq connection with no transaction open (psycopg 3 and psycopg2).
_IDLE = 0
#: The SQLSTATE of a missing table.
_UNDEFINED_TABLE = "42P01"


def installed() -> bool:
    """Whether psycopg 3 can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(PSYCOPG) is not None
    except (ImportError, ValueError):  # (ValueError: set to None in sys.modules, as tests do)
        return False


def psycopg() -> Any:
    """The psycopg 3 module.

    Raises:
      ConfigurationError: it is not installed.
    """
    try:
        return importlib.import_module(PSYCOPG)
    except ImportError as exc:
        raise ConfigurationError(
            "the outbox (EPQ_OUTBOX_URL, epq relay, epq outbox) needs psycopg 3: pip install 'epq[postgres]'"
        ) from exc


def connect(url: str, *, autocommit: bool = True) -> Any:
    """A psycopg 3 connection to ``url``.

    Raises:
      ConfigurationError: psycopg is not installed.
      BrokerUnavailable: the database cannot be reached.
    """
    driver = psycopg()
    try:
        return driver.connect(url, autocommit=autocommit, connect_timeout=5)
    except driver.OperationalError as exc:
        problem = describe(exc)
        raise BrokerUnavailable(f"cannot reach the outbox database (EPQ_OUTBOX_URL): {problem}") from exc


def _refuse(kind: str, problem: str) -> InvalidRequest:
    return InvalidRequest(kind, [{"field": "tx", "message": problem}])


def dbapi_connection(tx: object, kind: str) -> Any:
    """The DBAPI connection of the application's transaction ``tx`` (named ``kind`` in errors),
    checked to have a transaction open, or one that opens with the next statement.

    Raises:
      InvalidRequest: ``tx`` is not a connection epq can write through, or it would commit each
        statement on its own (autocommit with no transaction block open): the job would be
        enqueued whatever the application's transaction did.
    """
    name = type(tx).__name__
    top = type(tx).__module__.split(".")[0]
    if name.startswith("Async"):
        raise _refuse(kind, f"{name} is asynchronous; epq's enqueue is synchronous: pass a sync connection")
    if top == "sqlalchemy":
        if callable(getattr(tx, "connection", None)):  # a Session: its connection, its transaction begun
            tx = tx.connection()  # type: ignore[attr-defined]
        elif not tx.in_transaction():  # type: ignore[attr-defined]
            raise _refuse(
                kind,
                "the SQLAlchemy Connection has no transaction begun: use `with engine.begin() as conn:` "
                "or conn.begin()",
            )
        tx = tx.connection.dbapi_connection  # type: ignore[attr-defined]
        top = type(tx).__module__.split(".")[0]
    if top not in ("psycopg", "psycopg2") or not callable(getattr(tx, "cursor", None)):
        raise _refuse(
            kind, f"expected a psycopg connection, or an SQLAlchemy Session or Connection, not {name}"
        )
    if getattr(tx, "closed", False):
        raise _refuse(kind, "the connection is closed")
    if getattr(tx, "autocommit", False) and tx.info.transaction_status == _IDLE:  # type: ignore[attr-defined]
        raise _refuse(
            kind,
            "the connection is in autocommit mode with no transaction open, so the job would be "
            "enqueued whatever happens next: open one (psycopg: `with conn.transaction():`)",
        )
    return tx


class Statements:
    """Statements on one DBAPI connection, with a missing outbox table said as such."""

    def __init__(self, connection: Any, table: str) -> None:
        self.connection = connection
        self.table = table

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows ``sql`` returns ([] for a statement that returns none)."""
        with self._cursor() as cursor:
            self._execute(cursor, sql, params)
            return list(cursor.fetchall()) if cursor.description is not None else []

    def _execute(self, cursor: Any, sql: str, params: Sequence[Any]) -> None:
        try:
            cursor.execute(sql, params)
        except Exception as exc:
            code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
            if code == _UNDEFINED_TABLE:
                raise ConfigurationError(
                    f"the outbox table {self.table} does not exist in this database: create it with "
                    "`epq outbox migrate` (or the SQL in the README), or set EPQ_OUTBOX_TABLE to "
                    f"the one you made ({describe(exc)})"
                ) from exc
            raise

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        cursor = self.connection.cursor()
        try:
            yield cursor
        finally:
            cursor.close()


def display_dsn(url: str) -> str:
    """A database URL or ``key=value`` string with its password masked; safe to print."""
    if "://" in url:
        return mask_url(url)
    return _PASSWORD.sub(r"\1***", url)


_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def describe(exc: BaseException) -> str:
    """A driver error on one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Shared:
    """One connection of epq's own (autocommit), opened on first use and again after it broke,
    shared by the threads of a process (what ``QueueService.get_job`` reads pending jobs with)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._connection: Any = None

    @contextlib.contextmanager
    def statements(self, table: str) -> Iterator[Statements]:
        """Statements on the connection, for this thread alone meanwhile.

        Raises:
          BrokerUnavailable: the database cannot be reached (the next use connects again).
        """
        with self._lock:
            if self._connection is None or self._connection.closed:
                self._connection = connect(self.url)
            try:
                yield Statements(self._connection, table)
            except psycopg().OperationalError as exc:
                self._connection.close()
                raise BrokerUnavailable(f"the outbox database failed: {describe(exc)}") from exc

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
