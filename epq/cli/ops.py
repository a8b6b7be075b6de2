"""Operator commands: ``epq stats``, ``epq jobs list|show|cancel|delete|retry``,
``epq dead list|retry|purge``."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from ..backends.base import display_url
from ..errors import EpqError, InvalidPayload, JobNotFound
from ..models import JobRecord, JobState
from ..records import ID_PREFIX_CHARACTERS
from ..service import MAX_PAGE, QueueService, listing_filters
from ._broker import open_broker
from .common import BadArgument, command

#: The shortest id prefix ``jobs show|cancel`` and ``dead retry`` look up.
MIN_ID_PREFIX = 8
#: How long ``jobs cancel`` waits for the worker running a job to stop it.
CANCEL_WAIT_S = 3.0


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: columns as wide as their widest cell, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _last_error(record: JobRecord) -> str:
    if not record.errors:
        return "-"
    err = record.errors[-1]
    text = f"{err.error_type}: {err.message}".replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def show_record(record: JobRecord) -> str:
    rows = [
        ("id", record.id), ("kind", record.kind), ("state", record.state.value), ("queue", record.queue),
        ("priority", record.priority.value), ("attempt", f"{record.attempt} of {record.max_attempts}"),
        ("created", _when(record.created_at)), ("scheduled", _when(record.scheduled_at)),
        ("attempted", _when(record.attempted_at)), ("finalized", _when(record.finalized_at)),
        ("args", json.dumps(record.args)),
    ]  # fmt: skip
    if record.cancel_requested_at is not None:
        rows.insert(10, ("cancel asked", _when(record.cancel_requested_at)))
    if record.output is not None:
        rows.append(("output", json.dumps(record.output)))
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for err in record.errors:
        out.append(f"error (attempt {err.attempt}, {_when(err.at)}): {err.error_type}: {err.message}")
    return "\n".join(out)


#: The filters of ``jobs list|delete|retry``, as ``QueueService.list_jobs`` names them.
FILTERS = ("state", "kind", "queue", "priority", "endpoint_id")


def job_filters(args: argparse.Namespace) -> dict[str, Any]:
    """The filters given on the command line, checked (BadArgument naming the option)."""
    given = {name: getattr(args, name) for name in FILTERS if getattr(args, name, None) is not None}
    try:
        listing_filters(**given)
    except ValueError as exc:
        raise BadArgument(f"--{str(exc).replace('_', '-', str(exc).index(':'))}") from None
    return given


def list_table(records: Sequence[JobRecord]) -> str:
    headers = ("id", "kind", "state", "queue", "priority", "attempt", "created", "last error")
    rows = [
        [
            r.id,
            r.kind,
            r.state.value,
            r.queue,
            int(r.priority),
            r.attempt,
            _when(r.created_at),
            _last_error(r),
        ]
        for r in records
    ]
    return table(headers, rows)


def _jobs_list(svc: QueueService, args: argparse.Namespace) -> int:
    order = "oldest" if args.oldest else "newest"
    try:
        page = svc.list_jobs(**job_filters(args), limit=args.limit, cursor=args.cursor, order=order)
    except ValueError as exc:  # (the cursor: the filters and limit were checked before)
        raise BadArgument(f"--{exc}") from None
    if args.json:
        _dump({"jobs": [r.model_dump(mode="json") for r in page.jobs], "next_cursor": page.next_cursor})
        return 0
    print(list_table(page.jobs) if page.jobs else "no jobs")
    if page.next_cursor is not None:
        print(f"more: --cursor {page.next_cursor}", file=sys.stderr)
    return 0


def _jobs_delete(svc: QueueService, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    filters = job_filters(args)
    if args.job_id and (filters or args.all):
        parser.error("jobs delete takes one job ID, or filters, or --all")
    if not (args.job_id or filters or args.all):
        parser.error(
            "jobs delete takes one job ID, or filters (--state, --kind, ...), or --all for every job"
        )
    if args.job_id:
        record = svc.delete_job(resolve_job_id(svc, args.job_id))
        _dump({"deleted": 1}) if args.json else print(f"{record.id}: deleted (was {record.state.value})")
        return 0
    count = sum(1 for _ in svc.iter_jobs(**filters))
    what = f"{count} job(s)" + (f" ({_described(filters)})" if filters else " (every job)")
    if not args.yes and not _confirm(f"delete {what} on {display_url(svc.broker)}?", "jobs delete", count):
        return 1
    deleted = svc.delete_jobs(all=args.all, **filters)
    _dump({"deleted": deleted}) if args.json else print(f"deleted {deleted} job(s)")
    return 0


def _jobs_retry(svc: QueueService, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    filters = job_filters(args)
    if args.job_id and (filters or args.all):
        parser.error("jobs retry takes one job ID, or filters, or --all")
    if not (args.job_id or filters or args.all):
        parser.error(
            "jobs retry takes one job ID, or filters (--kind, --queue, ...), or --all for every dead job"
        )
    if args.job_id:
        retried = [svc.retry_dead(resolve_job_id(svc, args.job_id))]
    else:
        try:
            retried = svc.retry_dead_jobs(**filters)
        except ValueError as exc:
            raise BadArgument(f"--{exc}") from None
    if args.json:
        _dump([r.model_dump(mode="json") for r in retried])
    else:
        for r in retried:
            print(f"{r.id}: {r.state.value}")
        print(f"retried {sum(r.state is not JobState.DISCARDED for r in retried)} job(s)")
    return 0


def _described(filters: dict[str, Any]) -> str:
    return ", ".join(f"{name.replace('_', '-')} {value}" for name, value in filters.items())


def _dump(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    check_operator_args(args)
    broker = open_broker(args, may_start_embedded=False)
    svc = QueueService(broker)

    if args.command == "stats":
        while True:
            rows = svc.stats()
            if args.json:
                _dump(rows)
            else:
                if args.watch:
                    print("\x1b[2J\x1b[H", end="")
                    print(f"epq stats  {datetime.now(timezone.utc):%H:%M:%S} UTC  (every {args.watch:g} s)")
                headers = ("queue", "priority", "waiting", "scheduled", "running", "dead")
                print(table(headers, [[r[h] for h in headers] for r in rows]) if rows else "no jobs")
            if not args.watch:
                return 0
            sys.stdout.flush()
            time.sleep(args.watch)

    if args.command == "jobs" and args.jobs_command == "list":
        return _jobs_list(svc, args)
    if args.command == "jobs" and args.jobs_command == "delete":
        return _jobs_delete(svc, args, parser)
    if args.command == "jobs" and args.jobs_command == "retry":
        return _jobs_retry(svc, args, parser)
    if args.command == "jobs":
        job_id = resolve_job_id(svc, args.job_id)
        if args.jobs_command == "show":
            record = svc.get_job(job_id)
            if record is None:  # pragma: no cover - expired in between
                raise JobNotFound(job_id)
            _dump(record.model_dump(mode="json")) if args.json else print(show_record(record))
            return 0
        record = svc.cancel_job(job_id)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while record.state is JobState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.1)  # (its worker was asked to stop it: the outcome follows shortly)
            record = svc.get_job(job_id) or record
        cancelled = record.state is JobState.CANCELLED
        if args.json:
            _dump({"cancelled": cancelled, "job": record.model_dump(mode="json")})
        else:
            if cancelled:
                verdict = "cancelled"
            elif record.state is JobState.RUNNING:
                verdict = (
                    f"cancel requested: the job is still running after {CANCEL_WAIT_S:g} s (its "
                    "handler is stopped when it next runs Python code; `epq jobs show` tells)"
                )
            else:
                verdict = f"not cancelled: the job is {record.state.value}"
            print(f"{record.id}: {verdict}")
        return 0 if cancelled else 3

    if args.dead_command == "list":
        records = svc.list_dead(args.limit)
        if args.json:
            _dump([r.model_dump(mode="json") for r in records])
        elif not records:
            print("no dead jobs")
        else:
            headers = ("id", "kind", "queue", "attempts", "died", "last error")
            lines = [
                [r.id, r.kind, r.queue, r.attempt, _when(r.finalized_at), _last_error(r)] for r in records
            ]
            print(table(headers, lines))
        if not args.json:
            _unrecorded_dead_letters(svc, records if len(records) < args.limit else None)
        return 0
    if args.dead_command == "retry":
        if bool(args.job_id) == bool(args.all):
            parser.error("dead retry takes one job ID or --all")
        ids = [resolve_job_id(svc, args.job_id)] if args.job_id else [r.id for r in svc.list_dead(10**9)]
        retried = []
        for job_id in ids:
            try:
                retried.append(svc.retry_dead(job_id))
            except InvalidPayload as exc:
                if args.job_id:
                    raise
                print(f"epq: skipped {job_id}: {exc}", file=sys.stderr)  # (--all: the others still go)
        if args.json:
            _dump([r.model_dump(mode="json") for r in retried])
        else:
            for r in retried:
                print(f"{r.id}: {r.state.value}")
            print(f"retried {sum(r.state.value == 'available' for r in retried)} job(s)")
        return 0
    if not args.yes and not _confirm_purge(svc):
        return 1
    purged = svc.purge_dead()
    _dump({"purged": purged}) if args.json else print(f"purged {purged} dead job(s)")
    return 0


def check_operator_args(args: argparse.Namespace) -> None:
    """Refuse values of the operator commands' options that cannot work, before connecting."""
    job_filters(args)
    watch = getattr(args, "watch", None)
    if watch is not None and not (math.isfinite(watch) and watch > 0):
        raise BadArgument(f"--watch: the refresh interval is a number of seconds above 0, not {watch:g}")
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise BadArgument(f"--limit: the number of jobs to list is 1 or more, not {limit}")
    if limit is not None and getattr(args, "jobs_command", None) == "list" and limit > MAX_PAGE:
        raise BadArgument(f"--limit: a page holds 1..{MAX_PAGE} jobs, not {limit}")


def resolve_job_id(svc: QueueService, given: str) -> str:
    """The id of the job ``given`` names: its whole id, or a unique prefix of at least
    ``MIN_ID_PREFIX`` characters.

    Raises:
      JobNotFound: no job has that id or prefix.
      EpqError: the prefix matches more than one job (the message lists them).
    """
    if svc.get_job(given) is not None:
        return given
    if len(given) < MIN_ID_PREFIX or not ID_PREFIX_CHARACTERS.fullmatch(given):
        raise JobNotFound(given)
    shown = 10
    matches = svc.find_job_ids(given, limit=shown + 1)
    if not matches:
        raise JobNotFound(given)
    if len(matches) > 1:
        listed = ", ".join(sorted(matches[:shown])) + (", ..." if len(matches) > shown else "")
        raise EpqError(f"job id prefix {given!r} matches {len(matches)} jobs: {listed}; give more characters")
    return matches[0]


def _unrecorded_dead_letters(svc: QueueService, records: Sequence[JobRecord] | None) -> None:
    """Say which dead-letter queues hold messages that no record lists (``records``: every dead
    record, or None when the listing was cut by ``--limit``)."""
    if records is None:
        return
    listed: dict[str, int] = {}
    for record in records:
        listed[record.queue] = listed.get(record.queue, 0) + 1
    for queue, held in svc.dead_letter_counts().items():
        if held > listed.get(queue, 0):
            print(
                f"{queue}.XQ holds {held} message(s), {held - listed.get(queue, 0)} without a record "
                "(plain Dramatiq actors' dead letters, jobs retried or purged since, or dead jobs "
                "past EPQ_DEAD_MAX); "
                "epq dead purge empties it"
            )


def _confirm(question: str, command: str, count: int) -> bool:
    """Ask ``question`` on the terminal (nothing to ask when ``count`` is 0); without a terminal,
    refuse (EpqError: pass --yes)."""
    if count == 0:
        return True
    if not sys.stdin.isatty():
        raise EpqError(
            f"{command} would {question.rstrip('?')} and asks first, but stdin is not a terminal: "
            "pass --yes to go on without asking"
        )
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return True
    print("nothing done", file=sys.stderr)
    return False


def _confirm_purge(svc: QueueService) -> bool:
    """Ask on the terminal before ``dead purge`` forgets the dead jobs; without a terminal, refuse."""
    count = len(svc.list_dead(10**9))
    held = sum(svc.dead_letter_counts().values())
    what = f"{count} dead job(s) and {held} message(s) in the dead-letter queues"
    if not sys.stdin.isatty():
        raise EpqError(
            f"dead purge would forget {what} and asks first, but stdin is not a "
            "terminal: pass --yes to purge without asking"
        )
    if count == 0 and held == 0:
        return True
    question = f"purge {what} on {display_url(svc.broker)}? [y/N] "
    print(question, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer in ("y", "yes"):
        return True
    print("nothing purged", file=sys.stderr)
    return False
