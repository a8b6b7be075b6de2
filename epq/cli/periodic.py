"""``epq periodic``: the periodic jobs (``epq.periodic_jobs``), each with its next tick, its last
tick and the state of the job that tick enqueued.

The jobs are those of ``EPQ_PERIODIC`` and those the handler modules declare (``EPQ_HANDLERS``
and ``--handlers``, imported here as a worker imports them)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from ..handlers import import_handler_modules
from ..middleware.common import find_middleware
from ..periodic_jobs import Status, Ticking, status
from ..service import QueueService
from ..settings import get_settings
from ._broker import open_broker
from .common import command
from .ops import table


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat()


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    broker = open_broker(args, may_start_embedded=False)
    modules = list(get_settings().handlers)
    if args.handlers:
        modules += [m.strip() for m in args.handlers.split(",") if m.strip()]
    import_handler_modules(dict.fromkeys(modules))  # (after the set-up: their actors bind to it)
    ticking = find_middleware(broker, Ticking)
    rows = status(broker, ticking) if ticking is not None else []
    svc = QueueService(broker)
    states = {}  # the last job's state, when it has a record (an application's actor may keep none)
    for row in rows:
        record = svc.get_job(row.last_job_id) if row.last_job_id else None
        if record is not None:
            states[row.name] = record.state.value
    if args.json:
        print(json.dumps([_as_json(row, states.get(row.name)) for row in rows], indent=2))
        return 0
    if not rows:
        print("no periodic jobs (declare them with epq.periodic in a handler module, or EPQ_PERIODIC)")
        return 0
    headers = ("name", "kind", "when", "next run (UTC)", "last run (UTC)", "last job", "state")
    lines = [
        [
            row.name, row.kind, row.timing, _next(row), _when(row.last_tick_ms),
            row.last_job_id or "-", states.get(row.name, "-"),
        ]
        for row in rows
    ]  # fmt: skip
    print(table(headers, lines))
    for row in rows:
        if row.problem:
            print(f"{row.name}: not run: {row.problem}")
    return 0


def _next(row: Status) -> str:
    return _when(row.next_ms) + (" (due)" if row.due else "")


def _as_json(row: Status, state: str | None) -> dict[str, Any]:
    return {
        "name": row.name,
        "kind": row.kind,
        "when": row.timing,
        "request": json.loads(row.request) if row.request.startswith("{") else row.request,
        "next_run": _iso(row.next_ms),
        "due": row.due,
        "last_run": _iso(row.last_tick_ms),
        "last_job_id": row.last_job_id,
        "last_job_state": state,
        "problem": row.problem,
    }
