"""Build a Dramatiq broker from a URL, and check that it can be reached.

The memory (stub) and Redis brokers are imported with this module; the RabbitMQ broker only when
a RabbitMQ URL is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import dramatiq

from ..errors import ConfigurationError
from ..records import DEFAULT_COMPLETED_MAX, DEFAULT_DEAD_MAX
from .base import Backend, RecordStore, StateStore
from .memory import EpqStubBroker, MemoryRecords, MemoryStateStore
from .redis.broker import EpqRedisBroker
from .redis.connections import CONNECT_TIMEOUT_S, redis_client
from .redis.store import RedisRecords, RedisStateStore
from .urls import EMBEDDED_SCHEME, RABBITMQ_SCHEMES, REDIS_SCHEMES, STUB_SCHEME, mask_url, scheme_of

#: The module of the RabbitMQ broker, imported only when a RabbitMQ URL is used: a process on
#: Redis or the stub broker never loads pika (this is the one place epq imports a broker lazily).
RABBITMQ_MODULE = "epq.backends.rabbitmq.broker"


def build_broker(url: str, *, middleware: Sequence[dramatiq.Middleware] = ()) -> dramatiq.Broker:
    """Build the broker ``url`` names and check that its server answers.

    Raises:
      ConfigurationError: the scheme is not one epq knows.
      BrokerUnavailable: the server cannot be reached (the URL is shown masked).
    """
    scheme = scheme_of(url)
    broker: Any
    if scheme == STUB_SCHEME:
        broker = EpqStubBroker(middleware=list(middleware))
    elif scheme in REDIS_SCHEMES or scheme == EMBEDDED_SCHEME:
        broker = EpqRedisBroker(client=redis_client(url), middleware=list(middleware))
    else:
        assert scheme in RABBITMQ_SCHEMES
        rabbitmq = importlib.import_module(RABBITMQ_MODULE)
        broker = rabbitmq.connect(url, middleware=list(middleware), timeout_s=CONNECT_TIMEOUT_S)
    result: dramatiq.Broker = broker
    return result


class BuiltBackend(NamedTuple):
    """A broker with the state and record stores epq keeps beside it."""

    broker: dramatiq.Broker
    state: StateStore
    records: RecordStore


def build_backend(
    broker_url: str,
    *,
    state_url: str | None = None,
    middleware: Sequence[dramatiq.Middleware] = (),
    completed_max: int = DEFAULT_COMPLETED_MAX,
    dead_max: int = DEFAULT_DEAD_MAX,
    queue_concurrency: Mapping[str, int] | None = None,
    outbox_table: str = "epq_outbox",
) -> BuiltBackend:
    """The broker ``broker_url`` names, and epq's state and records: in memory for the stub
    broker; in the broker's Redis, or in the Redis ``state_url`` names (which RabbitMQ needs).
    The stores are set on the broker (``broker.epq``, a :class:`~epq.backends.base.Backend`: its
    delayed messages go to the state store's schedule), with ``queue_concurrency``, the most jobs of
    each queue a worker process runs at once (none: no queue is capped), and ``outbox_table``, the
    table enqueues with ``tx=`` write to (``epq.outbox``).

    Raises:
      ConfigurationError: an unknown URL scheme, RabbitMQ without a state URL, or a state URL
        that does not name a Redis.
      BrokerUnavailable: a server cannot be reached.
    """
    scheme = scheme_of(broker_url)
    if scheme in RABBITMQ_SCHEMES and not state_url:
        raise ConfigurationError(
            f"the RabbitMQ broker at {mask_url(broker_url)} needs a Redis for epq's state: "
            "set EPQ_STATE_URL (e.g. redis://127.0.0.1:6379/0)"
        )
    state_client = None
    if state_url and scheme != STUB_SCHEME:
        state_scheme = scheme_of(state_url)
        if state_scheme not in REDIS_SCHEMES | {EMBEDDED_SCHEME}:
            raise ConfigurationError(
                f"EPQ_STATE_URL must name a Redis server, not {state_scheme}:// ({mask_url(state_url)})"
            )
        state_client = redis_client(state_url)  # fails fast on an unreachable state store
    broker: Any = build_broker(broker_url, middleware=middleware)
    state: StateStore
    records: RecordStore
    fused = False
    bounds = {"completed_max": completed_max, "dead_max": dead_max}  # of the records kept
    if scheme == STUB_SCHEME:
        memory = MemoryStateStore()
        state, records = memory, MemoryRecords(memory, **bounds)
    else:
        client = state_client if state_client is not None else broker.client
        redis_state = RedisStateStore(client)
        fused = client is getattr(broker, "client", None)
        beside = broker.namespace if fused else None  # records filed beside their messages
        records = RedisRecords(client, redis_state.now_ms, **bounds, messages_ns=beside)
        state = redis_state
    broker.epq = Backend(
        mask_url(broker_url), state, records, fused, dict(queue_concurrency or {}), outbox_table
    )
    return BuiltBackend(broker, state, records)
