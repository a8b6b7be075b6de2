"""The ``epq`` command: ``worker``, ``enqueue``, ``demo``, ``stats``, ``jobs``, ``dead``,
``migrate-queues``, ``embedded``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import EpqError, InvalidRequest
from .kinds import KINDS

_DICT_FIELDS = {"source_data", "job_metadata", "source_metadata", "trigger_metadata", "schedule_metadata"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epq",
        description="epq: the Endpoints job queue on Dramatiq.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = sub.add_parser(
        "worker",
        help="run a Dramatiq worker on the epq actors and the handler modules",
        description="Runs `dramatiq epq.actors HANDLER_MODULES...`; anything after -- goes to dramatiq.",
    )
    worker.add_argument("--processes", "-p", type=int, help="worker processes (dramatiq's default: CPUs)")
    worker.add_argument("--threads", "-t", type=int, help="threads per process (dramatiq's default: 8)")
    worker.add_argument("--queues", "-Q", nargs="+", metavar="QUEUE", help="serve only these queues")
    worker.add_argument(
        "--handlers", metavar="MODULES",
        help="comma-separated handler modules (added to EPQ_HANDLERS)",
    )  # fmt: skip
    worker.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")
    worker.add_argument("dramatiq_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    enqueue = sub.add_parser(
        "enqueue",
        help="enqueue one job and print the result as JSON",
        description="Fields are given as --field-name VALUE (dashes or underscores); object fields "
        "(source_data, *_metadata) take JSON. Example: epq enqueue index_endpoint "
        "--endpoint-id 6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f --source API",
    )
    enqueue.add_argument("kind", choices=sorted(KINDS), metavar="KIND", help=", ".join(KINDS))
    enqueue.add_argument("--json", dest="json_fields", metavar="OBJECT", help="all fields as one JSON object")
    enqueue.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    demo = sub.add_parser("demo", help="run every job kind through a worker on a throwaway embedded Redis")
    demo.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the jobs (default 60)")

    stats = sub.add_parser("stats", help="jobs per queue and priority: waiting, scheduled, running, dead")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument(
        "--watch", type=float, nargs="?", const=2.0, metavar="SECONDS", help="refresh every N s"
    )
    stats.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    jobs = sub.add_parser("jobs", help="look at or cancel one job")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, text in (("show", "show a job's record"), ("cancel", "cancel a job that has not started")):
        action = jobs_sub.add_parser(name, help=text)
        action.add_argument("job_id", metavar="ID")
        action.add_argument("--json", action="store_true", help="print JSON")
        action.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    dead = sub.add_parser("dead", help="discarded jobs: list, retry, purge")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    listing = dead_sub.add_parser("list", help="discarded jobs, newest first, with their last error")
    listing.add_argument("--limit", type=int, default=50)
    retry = dead_sub.add_parser("retry", help="run discarded jobs again (same id, kind and args)")
    retry.add_argument("job_id", nargs="?", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every discarded job")
    purge = dead_sub.add_parser("purge", help="forget every discarded job")
    for action in (listing, retry, purge):
        action.add_argument("--json", action="store_true", help="print JSON")
        action.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")

    migrate = sub.add_parser(
        "migrate-queues",
        help="re-create RabbitMQ queues declared without epq's priority argument, keeping their messages",
        description="Stop the workers first. Each served queue declared with other arguments (by an "
        "older epq or plain Dramatiq) is emptied into a holding queue, re-created with "
        "x-max-priority, and refilled. Safe to run again after a crash; nothing to do on Redis.",
    )
    migrate.add_argument("--broker-url", help="overrides EPQ_BROKER_URL")
    migrate.add_argument("--json", action="store_true", help="print JSON")

    emb = sub.add_parser("embedded", help="manage the embedded Redis server")
    emb_sub = emb.add_subparsers(dest="embedded_command", required=True, metavar="ACTION")
    stop = emb_sub.add_parser("stop", help="stop the embedded Redis server (data is kept on disk)")
    stop.add_argument("path", nargs="?", help="its database file (default: the one epq uses by default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "worker":
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)} (put dramatiq options after --)")
            return _worker(args)
        if args.command == "enqueue":
            return _enqueue(args, extra, parser)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "demo":
            from . import _demo

            return _demo.run(timeout_s=args.timeout)
        if args.command == "migrate-queues":
            return _migrate_queues(args)
        if args.command in ("stats", "jobs", "dead"):
            from . import _ops

            return _ops.run(args, parser)
        return _embedded_stop(args)
    except InvalidRequest as exc:
        print(f"epq: error: {exc}", file=sys.stderr)
        return 2
    except EpqError as exc:
        print(f"epq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def worker_command(args: argparse.Namespace) -> list[str]:
    """The dramatiq command line ``epq worker`` runs."""
    from .settings import get_settings

    modules = list(get_settings().handlers)
    if args.handlers:
        modules += [m.strip() for m in args.handlers.split(",") if m.strip()]
    cmd = [sys.executable, "-m", "dramatiq", "epq.actors", *dict.fromkeys(modules)]
    if args.processes is not None:
        cmd += ["--processes", str(args.processes)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.queues:
        cmd += ["--queues", *args.queues]
    rest = list(args.dramatiq_args or [])
    if rest and rest[0] == "--":
        rest = rest[1:]
    return cmd + rest


def _worker(args: argparse.Namespace) -> int:
    if args.broker_url:
        os.environ["EPQ_BROKER_URL"] = args.broker_url
    cmd = worker_command(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover - execv does not return


def parse_fields(kind: str, extra: Sequence[str], json_fields: str | None) -> dict[str, Any]:
    """Turn ``--field-name VALUE`` pairs (and ``--json``) into request fields."""
    fields: dict[str, Any] = {}
    if json_fields:
        try:
            loaded = json.loads(json_fields)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(kind, [{"field": "--json", "message": f"not valid JSON: {exc}"}]) from None
        if not isinstance(loaded, dict):
            raise InvalidRequest(kind, [{"field": "--json", "message": "must be a JSON object"}])
        fields.update(loaded)
    items = list(extra)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise InvalidRequest(kind, [{"field": flag, "message": "expected --field-name VALUE"}])
        name, eq, value = flag[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if not items:
                raise InvalidRequest(kind, [{"field": name, "message": "missing value"}])
            value = items.pop(0)
        if name in _DICT_FIELDS:
            try:
                fields[name] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(kind, [{"field": name, "message": f"not valid JSON: {exc}"}]) from None
        elif name == "priority":
            fields[name] = int(value) if value.lstrip("-").isdigit() else value
        else:
            fields[name] = value
    return fields


def _enqueue(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    from ._runtime import setup
    from .service import QueueService

    fields = parse_fields(args.kind, extra, args.json_fields)
    broker = setup(args.broker_url) if args.broker_url else setup()
    result = QueueService(broker).enqueue(args.kind, fields)
    print(result.model_dump_json(indent=2))
    return 0


def _migrate_queues(args: argparse.Namespace) -> int:
    from ._runtime import setup
    from .migrate import migrate_queues

    broker = setup(args.broker_url) if args.broker_url else setup()
    done = migrate_queues(broker)
    if args.json:
        print(json.dumps([vars(m) for m in done], indent=2))
    elif not done:
        print("nothing to migrate: only RabbitMQ queues need it")
    else:
        print("\n".join(m.describe() for m in done))
    return 0


def _embedded_stop(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .brokers import embedded
    from .brokers.urls import embedded_path
    from .settings import default_state_dir

    path = Path(args.path).expanduser().absolute() if args.path else default_state_dir() / "redis.db"
    if args.path and "://" in args.path:
        path = embedded_path(args.path)
    stopped = embedded.stop_server(path)
    print(f"stopped the embedded Redis for {path}" if stopped else f"no embedded Redis running for {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
