"""The outbox table's SQL, written once: ``epq outbox migrate`` runs :func:`schema_sql`, the
README shows it for teams that run their own migrations (a test checks that the two agree), and
every statement epq sends to the table is here.

One row per job committed and not yet relayed; a relay deletes the rows it has moved into epq's
state store. ``id`` orders the rows (the relay takes the oldest first, through the primary key's
index, skipping rows another relay holds, so its query reads a handful of index entries however
long the backlog); ``job_id`` is the job's id from the moment its caller enqueued it;
``unique_key`` holds the key of the uniqueness lock the job will take, unique among pending
rows, so that a second transaction enqueueing a held key is told at once, as River's unique
index does. A statement trigger wakes the relays (``NOTIFY``) when a transaction that inserted
rows commits.
"""

from __future__ import annotations

from typing import NamedTuple


class Names(NamedTuple):
    """The names the outbox's SQL uses, made from the table's (``EPQ_OUTBOX_TABLE``, checked by
    ``epq.settings.TABLE_NAME``: it is written into SQL as it is)."""

    table: str  # as given: name or schema.name
    schema: str | None
    unique_index: str  # unqualified (an index lives in its table's schema)
    notify_function: str  # qualified like the table
    trigger: str  # unqualified (a trigger belongs to its table)
    channel: str  # what the relays LISTEN to (a quoted identifier), the table's name as given


def names(table: str) -> Names:
    schema, _, bare = table.rpartition(".")
    prefix = f"{schema}." if schema else ""
    return Names(
        table=table,
        schema=schema or None,
        unique_index=f"{bare}_unique_key",
        notify_function=f"{prefix}{bare}_notify",
        trigger=f"{bare}_notify",
        channel=table,
    )


def schema_sql(table: str = "epq_outbox") -> str:
    """The SQL that creates the outbox table, its index and its trigger (idempotent: it may run
    again, say after an upgrade of epq)."""
    n = names(table)
    schema = f"CREATE SCHEMA IF NOT EXISTS {n.schema};\n" if n.schema else ""
    return f"""{schema}CREATE TABLE IF NOT EXISTS {n.table} (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     text   NOT NULL UNIQUE,
    kind       text   NOT NULL,
    payload    jsonb  NOT NULL,
    unique_key text,
    created_ms bigint NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS {n.unique_index} ON {n.table} (unique_key)
    WHERE unique_key IS NOT NULL;
CREATE OR REPLACE FUNCTION {n.notify_function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{n.channel}', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS {n.trigger} ON {n.table};
CREATE TRIGGER {n.trigger} AFTER INSERT ON {n.table}
    FOR EACH STATEMENT EXECUTE FUNCTION {n.notify_function}();
"""


#: The columns a pending job is read with (``epq.outbox.pending.PendingRow``).
_ROW = "job_id, kind, payload, unique_key, created_ms"


#: Rows whose unique key a pending row holds are not written (and the statement returns the
#: job ids of the rows it wrote).
_UNLESS_HELD = "ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING RETURNING job_id"


def insert(table: str) -> str:
    """Write rows (arrays of job ids, kinds, payloads as JSON text, unique keys or NULL, creation
    times in ms), unless a pending row holds their unique key; returns the job ids written."""
    return (
        f"INSERT INTO {table} (job_id, kind, payload, unique_key, created_ms) "
        "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]::jsonb[], %s::text[], %s::bigint[]) "
        + _UNLESS_HELD
    )


def insert_one(table: str) -> str:
    """:func:`insert` of one row (its values, not arrays: cheaper to send)."""
    return (
        f"INSERT INTO {table} (job_id, kind, payload, unique_key, created_ms) "
        f"VALUES (%s, %s, %s::jsonb, %s, %s) {_UNLESS_HELD}"
    )


def holding(table: str) -> str:
    """The pending rows that hold unique keys (an array)."""
    return f"SELECT {_ROW} FROM {table} WHERE unique_key = ANY(%s::text[])"


def pending(table: str) -> str:
    """The pending row of a job id, if any."""
    return f"SELECT {_ROW} FROM {table} WHERE job_id = %s"


def forget(table: str) -> str:
    """Delete the rows of job ids (an array): in the caller's transaction, rows it has just
    written for keys the state store turned out to hold."""
    return f"DELETE FROM {table} WHERE job_id = ANY(%s::text[])"


def claim(table: str) -> str:
    """The oldest rows no other relay holds, locked until the relay's transaction ends (a limit)."""
    return f"SELECT id, {_ROW} FROM {table} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"


def relayed(table: str) -> str:
    """Delete the rows a relay has moved (an array of ids)."""
    return f"DELETE FROM {table} WHERE id = ANY(%s::bigint[])"


def listen(table: str) -> str:
    return f'LISTEN "{names(table).channel}"'


def backlog(table: str) -> str:
    """How many rows wait, and when the oldest was enqueued (ms; NULL when none)."""
    return f"SELECT count(*), min(created_ms) FROM {table}"
