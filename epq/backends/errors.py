"""What the drivers' errors mean to epq: the one module outside a backend's own that knows
redis-py's errors (epq's state store is always a Redis or memory), so that the semantics
(``epq.outage``, ``epq.middleware``, the enqueue paths) can tell an outage from a bug without
importing a driver."""

from __future__ import annotations

import redis
from dramatiq.errors import BrokerConnectionError

#: Errors of the state store (any failure of the Redis that holds epq's state, or of its socket).
STORE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
#: Errors of a connection that broke or timed out (the call may or may not have run).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)

#: Redis errors that mean the server cannot be reached right now (``BusyLoadingError``, a Redis
#: loading its data after a restart, is a ``ConnectionError``; ``ReadOnlyError``, a replica that is
#: not promoted yet after a failover, and ``OutOfMemoryError`` pass too).
UNREACHABLE: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    redis.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # type: ignore[attr-defined]  # (missing from types-redis)
)
#: Replies of a Redis that cannot take writes for now (a failed snapshot, a busy script, a cluster
#: in the middle of a change).
UNREACHABLE_REPLIES = ("MISCONF", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "LOADING")


def store_unreachable(exc: BaseException) -> bool:
    """Whether a driver error means the state store cannot be reached now (an outage to wait
    out, not a bug)."""
    if isinstance(exc, redis.ResponseError):
        return isinstance(exc, UNREACHABLE) or str(exc).startswith(UNREACHABLE_REPLIES)
    return isinstance(exc, UNREACHABLE)


def broker_gone(exc: BaseException) -> bool:
    """Whether an error publishing a message means the broker's connection is gone (as opposed to
    this one message being refused)."""
    return isinstance(exc, (BrokerConnectionError, redis.ConnectionError))


def unreachable_errors(broker: object) -> tuple[type[BaseException], ...]:
    """The errors that mean a server could not be reached while enqueueing on ``broker`` (the
    enqueue paths map them to ``BrokerUnavailable``): Dramatiq's ``BrokerConnectionError``,
    ``OSError``, redis-py's (the state store is a Redis) and those of the broker's own driver
    (pika's for RabbitMQ), found on the broker so that no driver is imported for nothing."""
    own: tuple[type[BaseException], ...] = getattr(broker, "epq_driver_errors", ())
    return (BrokerConnectionError, OSError, redis.RedisError, *own)
