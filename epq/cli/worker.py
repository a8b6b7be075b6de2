"""``epq worker``: checks in this process what Dramatiq would report with a traceback, then
becomes ``dramatiq epq.actors HANDLER_MODULES...``, with threads enough for the budgets of the
queues it serves (``epq.concurrency``) unless it is told how many."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .. import _runtime
from ..concurrency import describe, queue_budgets, threads_for
from ..errors import ConfigurationError
from ..middleware.common import find_middleware
from ..periodic_jobs import Ticking
from ..settings import get_settings
from ._broker import connect
from .common import command


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    if args.broker_url:
        os.environ["EPQ_BROKER_URL"] = args.broker_url
    if args.metrics_port is not None:
        os.environ["EPQ_METRICS_PORT"] = str(args.metrics_port)
    cmd = worker_command(args)
    print(check_worker(args), file=sys.stderr)
    print(f"epq: {_threads_line(args)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover - execv does not return


def worker_command(args: argparse.Namespace) -> list[str]:
    """The dramatiq command line ``epq worker`` runs (threads: see :func:`_threads`)."""
    cmd = [sys.executable, "-m", "dramatiq", "epq.actors", *_handler_modules(args)]
    if args.processes is not None:
        cmd += ["--processes", str(args.processes)]
    threads = _threads(args)
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if args.queues:
        cmd += ["--queues", *args.queues]
    return cmd + _dramatiq_args(args)


def _threads(args: argparse.Namespace) -> int | None:
    """The worker's threads a process: ``--threads``; else, unless dramatiq's own option (after
    ``--``) sets them (None), the sum of the budgets of the queues it serves, so that each queue
    can run its whole budget at once (``EPQ_QUEUE_CONCURRENCY``)."""
    if args.threads is not None:
        return int(args.threads)
    if _threads_given(_dramatiq_args(args)):
        return None
    return threads_for(_served_budgets(args))


def _served_budgets(args: argparse.Namespace) -> dict[str, int]:
    """The budget of each queue the worker serves (``--queues``, else every queue epq declares)."""
    settings = get_settings()
    return queue_budgets(args.queues or settings.queues, settings.queue_concurrency)


def _threads_given(dramatiq_args: Sequence[str]) -> bool:
    """Whether dramatiq's own options set its threads (``-t 4``, ``-t4``, ``--threads=4``, and
    argparse's abbreviations such as ``--thr 4``)."""
    for arg in dramatiq_args:
        name = arg.split("=", 1)[0]
        short = arg.startswith("-t") and not arg.startswith("--")
        if short or (len(name) > 2 and "--threads".startswith(name)):
            return True
    return False


def _threads_line(args: argparse.Namespace) -> str:
    """What ``epq worker`` says about its threads and the budgets of the queues it serves."""
    threads = _threads(args)
    head = "threads as dramatiq's options say" if threads is None else f"{threads} threads a process"
    return f"{head}; jobs at once per queue in each: {describe(_served_budgets(args))}"


def _handler_modules(args: argparse.Namespace) -> list[str]:
    modules = list(get_settings().handlers)
    if args.handlers:
        modules += [m.strip() for m in args.handlers.split(",") if m.strip()]
    return list(dict.fromkeys(modules))


def _dramatiq_args(args: argparse.Namespace) -> list[str]:
    rest = list(args.dramatiq_args or [])
    return rest[1:] if rest and rest[0] == "--" else rest


def check_worker(args: argparse.Namespace) -> str:
    """Check, in this process, what Dramatiq would otherwise report with a traceback: the
    settings, the broker and state store, the queues to serve (on RabbitMQ, that they carry
    epq's arguments) and the handler modules; warn of periodic jobs whose kind is no actor.
    Closes what it opened; returns the line that says which broker the worker will use.

    Raises:
      ConfigurationError, BrokerUnavailable: with the fix in the message.
    """
    settings = get_settings()  # invalid settings raise here, naming the variable
    unknown = [q for q in args.queues or () if q not in settings.queues]
    if unknown:
        raise ConfigurationError(
            f"--queues {' '.join(unknown)}: not among the queues epq declares "
            f"(EPQ_QUEUES={','.join(settings.queues)}); add them to EPQ_QUEUES or serve those"
        )
    try:
        broker, line = connect(args, may_start_embedded=True)
        check_queues = getattr(broker, "check_queues", None)
        if check_queues is not None:  # RabbitMQ: a queue without x-max-priority is refused here
            check_queues(args.queues or settings.queues)
        _import_handler_modules(_handler_modules(args), _dramatiq_args(args))
        ticking = find_middleware(broker, Ticking)
        for name, problem in (ticking.problems(broker) if ticking is not None else {}).items():
            print(f"epq: warning: periodic job {name!r} will not run: {problem}", file=sys.stderr)
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
