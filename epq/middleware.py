"""epq's Dramatiq middleware.

``EpqRetries`` replaces Dramatiq's ``Retries``: it counts attempts the River way
(``max_attempts`` includes the first run), follows each kind's backoff schedule with ±25 %
jitter, and dead-letters at once the errors named in the actor's ``throws``.
``EpqMiddleware`` loads the handler modules when a worker boots and warns about kinds without
a handler. Both hold no per-message state on ``self``: one instance serves every worker thread.

Times are milliseconds, as everywhere in Dramatiq.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.errors import Retry
from dramatiq.middleware import Retries

from .handlers import import_handler_modules, missing_kinds

logger = logging.getLogger("epq")

#: Jitter applied to every backoff delay: the delay is drawn from [1 - J, 1 + J] * base.
BACKOFF_JITTER = 0.25


def _option(message: MessageProxy | dramatiq.Message[Any], actor: dramatiq.Actor[Any, Any], name: str) -> Any:
    """Message option > actor option (Dramatiq's precedence)."""
    if name in message.options:
        return message.options[name]
    return actor.options.get(name)


def backoff_delay_ms(schedule: Sequence[int], retry_number: int) -> int:
    """The delay before retry ``retry_number`` (1-based): the schedule's entry, ±25 % jitter.

    Past the end of the schedule its last entry repeats.
    """
    base = schedule[min(retry_number, len(schedule)) - 1]
    return int(base * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))


class EpqRetries(Retries):
    """Retries with River's attempt counting and per-kind backoff schedules.

    Actor options (a message option of the same name wins):
      max_attempts(int): total runs allowed, the first one included.
      backoff_ms(list[int]): delay before retry 1, 2, …; the last entry repeats.
      throws(tuple[type[Exception], ...]): errors that dead-letter at once, never retried.

    Actors without ``max_attempts`` get Dramatiq's own ``Retries`` behaviour.
    """

    @property
    def actor_options(self) -> set[str]:
        return set(super().actor_options) | {"max_attempts", "backoff_ms"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        actor = broker.get_actor(message.actor_name)
        max_attempts = _option(message, actor, "max_attempts")
        if max_attempts is None:
            super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]
            return

        attempt = int(message.options.get("retries", 0)) + 1
        message.options["retries"] = attempt
        message.options["traceback"] = traceback.format_exc(limit=30)
        message.options["requeue_timestamp"] = int(time.time() * 1000)

        throws = actor.options.get("throws")
        if throws and isinstance(exception, throws):
            logger.warning(
                "Discarding %s job %s without retry: %s", message.actor_name, message.message_id, exception
            )
            message.fail()
            return
        if attempt >= int(max_attempts):
            logger.warning(
                "%s job %s failed its last attempt (%d of %d); dead-lettering it",
                message.actor_name,
                message.message_id,
                attempt,
                max_attempts,
            )
            message.fail()
            return

        if isinstance(exception, Retry) and exception.delay is not None:
            delay = int(exception.delay)
        else:
            delay = backoff_delay_ms(_option(message, actor, "backoff_ms") or [self.min_backoff], attempt)
        logger.info(
            "Retrying %s job %s (attempt %d of %d) in %d ms",
            message.actor_name,
            message.message_id,
            attempt + 1,
            max_attempts,
            delay,
        )
        broker.enqueue(message, delay=delay)  # type: ignore[arg-type]  # a proxy, as in Retries


class EpqMiddleware(dramatiq.Middleware):
    """Loads handler modules when a worker boots; the home of epq's per-job hooks.

    Parameters:
      handler_modules: modules to import in each worker process (``EPQ_HANDLERS``).
    """

    def __init__(self, *, handler_modules: Sequence[str] = ()) -> None:
        self.handler_modules = tuple(handler_modules)

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        import_handler_modules(self.handler_modules)
        missing = missing_kinds()
        if missing:
            logger.warning(
                "No handler registered for %s: their jobs will be dead-lettered. "
                "Register handlers with @epq.handler(kind) in a module named in EPQ_HANDLERS.",
                ", ".join(missing),
            )
