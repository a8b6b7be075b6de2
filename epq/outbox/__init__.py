"""The transactional outbox: jobs enqueued in the application's own PostgreSQL transaction.

``QueueService().enqueue_index_endpoint(request, tx=conn)`` (any ``enqueue_*``, ``enqueue``,
``enqueue_many``, and an actor's ``send_with_options(..., tx=conn)`` and ``send_many(...,
tx=conn)``) writes the job to the outbox table in the transaction ``conn`` has open (a psycopg 3
connection, or an SQLAlchemy 2 ``Session`` or ``Connection``), as the Go package's ``...Tx``
variants insert into River's table: if the transaction rolls back, nothing is ever enqueued;
once it commits, a relay moves the job into epq exactly once.

- ``sql``: the table, its index and trigger (:func:`schema_sql`), and every statement on it;
- ``connections``: the application's transaction (``tx``), and epq's own psycopg connections;
- ``pending``: the caller's side: rows written, uniqueness at call time, ``pending`` records;
- ``relay``: the relay (``epq relay``, and a thread in every worker process) and why it loses
  nothing and inserts nothing twice.

psycopg is imported only when epq opens a connection of its own (``EPQ_OUTBOX_URL``); SQLAlchemy
never (epq writes through the DBAPI connection underneath the application's).
"""

from __future__ import annotations

from .sql import schema_sql

__all__ = ["schema_sql"]
