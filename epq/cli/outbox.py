"""``epq relay`` (a relay on its own) and ``epq outbox migrate|status`` (the outbox table)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..backends.base import display_url
from ..outbox import sql
from ..outbox.connections import Statements, connect, display_dsn
from ..outbox.relay import RELAY_BATCH, Relay
from ..settings import get_settings
from ._broker import open_broker
from .common import BadArgument, command


def _outbox_url(args: argparse.Namespace) -> str:
    url: str | None = getattr(args, "outbox_url", None) or get_settings().outbox_url
    if not url:
        raise BadArgument(
            "no outbox database: set EPQ_OUTBOX_URL (or --outbox-url) to the application's PostgreSQL"
        )
    return url


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    """``epq outbox migrate|status``."""
    table = get_settings().outbox_table
    if args.outbox_command == "migrate" and args.print:
        sys.stdout.write(sql.schema_sql(table))
        return 0
    url = _outbox_url(args)
    with connect(url) as connection:
        if args.outbox_command == "migrate":
            with connection.transaction():
                connection.execute(sql.schema_sql(table))
            print(f"epq: the outbox table {table} is ready in {display_dsn(url)}")
            return 0
        ((count, oldest_ms),) = Statements(connection, table).rows(sql.backlog(table))
    age = None if oldest_ms is None else max(0.0, round(time.time() - int(oldest_ms) / 1000, 3))
    if args.json:
        print(json.dumps({"table": table, "pending": int(count), "oldest_pending_seconds": age}))
    else:
        oldest = "" if age is None else f", the oldest committed {age:.1f} s ago"
        print(f"{table}: {int(count)} job(s) pending{oldest}")
    return 0


@command
def relay(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    """``epq relay``: relay until SIGTERM or SIGINT."""
    if args.batch is not None and args.batch < 1:
        raise BadArgument(f"--batch must be 1 or more, not {args.batch}")
    url = _outbox_url(args)
    broker = open_broker(args, may_start_embedded=False)
    table = get_settings().outbox_table
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    def stopping(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    the_relay = Relay(broker, url, table, batch=args.batch or RELAY_BATCH)
    the_relay.relay_once()  # (fails here, with one line, if the database or the table is missing)
    print(
        f"epq: relaying {table} from {display_dsn(url)} to {display_url(broker)} (stop with Ctrl-C)",
        file=sys.stderr,
        flush=True,
    )
    the_relay.run(stop)
    return 0
