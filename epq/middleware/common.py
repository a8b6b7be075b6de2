"""What epq's middleware share: finding a middleware on a broker, reading an option, and keeping
an unexpected error in an enqueue hook from being swallowed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import MiddlewareError

from ..errors import EnqueueFailed, describe_error

M = TypeVar("M", bound=dramatiq.Middleware)


@contextlib.contextmanager
def enqueue_hook_errors(hook: str, message: dramatiq.Message[Any]) -> Iterator[None]:
    """Let no unexpected exception out of an epq ``before_enqueue`` hook as such: Dramatiq logs
    and ignores any that is not a ``MiddlewareError``, and would enqueue the job without its lock
    or record. It becomes :class:`EnqueueFailed` (a ``MiddlewareError``), which stops the enqueue."""
    try:
        yield
    except MiddlewareError:
        raise
    except Exception as exc:
        raise EnqueueFailed(
            f"{hook} failed for {message.actor_name} job {message.message_id}, which was not "
            f"enqueued: {describe_error(exc)}"
        ) from exc


def find_middleware(broker: dramatiq.Broker, kind: type[M]) -> M | None:
    """The broker's middleware of type ``kind``, if it has one."""
    for middleware in broker.middleware:
        if isinstance(middleware, kind):
            return middleware
    return None


def option(message: MessageProxy | dramatiq.Message[Any], actor: dramatiq.Actor[Any, Any], name: str) -> Any:
    """A message option, else the actor option of that name (Dramatiq's precedence)."""
    if name in message.options:
        return message.options[name]
    return actor.options.get(name)
