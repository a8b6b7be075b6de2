"""What every command module shares: the signature of a command's function, and ``command``,
which turns the errors a command reports into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

from ..errors import EpqError, InvalidRequest, describe_error

#: A command's function: the parsed arguments, the arguments the parser left (the request's
#: fields, for ``enqueue``; nothing for the others) and the parser; returns the exit code.
Command = Callable[[argparse.Namespace, Sequence[str], argparse.ArgumentParser], int]


class BadArgument(EpqError):
    """A command-line value the command cannot use (exit 2, like argparse's own errors)."""


def command(run: Command) -> Command:
    """Wrap a command's function: bad input (``InvalidRequest``, ``BadArgument``) is one line and
    exit 2; any other ``EpqError``, or a redis-py or pika error once connected, one line and exit 1.
    Any other exception is a bug and keeps its traceback."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
        try:
            return run(args, extra, parser)
        except (InvalidRequest, BadArgument) as exc:
            print(f"epq: error: {exc}", file=sys.stderr)
            return 2
        except EpqError as exc:
            print(f"epq: error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:
            if type(exc).__module__.split(".")[0] not in ("redis", "pika"):
                raise  # a bug: its traceback is what to report
            # the server went away after the command connected (say during `stats --watch`)
            print(f"epq: error: the broker or state store failed: {describe_error(exc)}", file=sys.stderr)
            return 1

    return wrapped
