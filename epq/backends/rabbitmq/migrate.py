"""``epq migrate-queues``: bring queues declared by an older epq (or plain Dramatiq) up to date.

RabbitMQ cannot change a queue's arguments, and epq's queues need ``x-max-priority``. For each
served queue (and its ``.DQ``) declared with other arguments, the migration:

1. moves every message to a holding queue ``<name>.epq-migrating``,
2. deletes the queue and declares it again with epq's arguments,
3. moves the messages back, each with its priority, and deletes the holding queue.

A message is acknowledged on the queue it leaves only after the queue it goes to has confirmed
it, so a crash at any step loses nothing; running the command again finishes the job (a crash
between a confirm and its ack can copy that one message, as any redelivery can). Workers must
be stopped: the command refuses a queue that has consumers.

On Redis nothing needs migrating: messages left on a queue's plain list by an older epq move to
their priority lanes as workers fetch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import dramatiq
import pika
import pika.exceptions
from dramatiq.common import dq_name

from ...errors import ConfigurationError
from ...priority import RABBITMQ_MAX_PRIORITY, amqp_priority, lane_of
from ..base import served_queues
from .broker import PRECONDITION_FAILED, EpqRabbitmqBroker

#: Suffix of the holding queue a migration moves messages through.
HOLDING_SUFFIX = ".epq-migrating"
NOT_FOUND = 404


@dataclass(frozen=True)
class QueueMigration:
    """What the migration did to one queue."""

    queue: str
    #: Whether the queue had to be re-created.
    migrated: bool
    #: Messages moved (back) into the queue from the holding queue.
    messages: int

    def describe(self) -> str:
        if self.migrated:
            done = f"re-created with x-max-priority={RABBITMQ_MAX_PRIORITY}"
            return f"{self.queue}: {done}, {self.messages} messages kept"
        back = f" ({self.messages} messages moved back)" if self.messages else ""
        return f"{self.queue}: up to date{back}"


def migrate_queues(broker: dramatiq.Broker) -> list[QueueMigration]:
    """Migrate every served queue of ``broker`` (RabbitMQ); other brokers need nothing."""
    if not isinstance(broker, EpqRabbitmqBroker):
        return []
    queues = served_queues(broker)
    connection = pika.BlockingConnection(broker.parameters)
    try:
        out = []
        for queue in queues:
            arguments = broker._build_queue_arguments(queue)  # type: ignore[no-untyped-call]
            for name in (queue, dq_name(queue)):
                out.append(_migrate_one(connection, name, arguments))
        broker.queues_pending.update(queues)  # declare them again on this broker's own channel
        return out
    finally:
        connection.close()


def _migrate_one(connection: pika.BlockingConnection, name: str, arguments: dict[str, Any]) -> QueueMigration:
    holding = name + HOLDING_SUFFIX
    holding_args = {"x-max-priority": RABBITMQ_MAX_PRIORITY}
    migrated = False
    if not _declare_with(connection, name, arguments):
        consumers = _consumers(connection, name)
        if consumers:
            raise ConfigurationError(
                f"RabbitMQ queue {name!r} has {consumers} consumer(s): stop the workers, then migrate"
            )
        _declare_with(connection, holding, holding_args)
        _empty_and_delete(connection, name, holding)
        if not _declare(
            connection, name, refused=PRECONDITION_FAILED, durable=True, arguments=arguments
        ):  # pragma: no cover - someone re-declared it meanwhile
            raise ConfigurationError(f"RabbitMQ queue {name!r} was declared again with other arguments")
        migrated = True
    moved_back = 0
    if _declare(connection, holding, refused=NOT_FOUND, passive=True):
        moved_back = _move(connection, holding, name)
        channel = connection.channel()
        channel.queue_delete(holding)
        channel.close()
    return QueueMigration(name, migrated, moved_back)


def _empty_and_delete(connection: pika.BlockingConnection, name: str, holding: str, tries: int = 5) -> None:
    """Move ``name``'s messages to ``holding``, then delete ``name`` only if it is still empty and
    unused (a producer or worker that came back meanwhile makes it try again)."""
    for _ in range(tries):
        _move(connection, name, holding)
        channel = connection.channel()
        try:
            channel.queue_delete(name, if_unused=True, if_empty=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != PRECONDITION_FAILED:
                raise
            continue
        channel.close()
        return
    raise ConfigurationError(
        f"RabbitMQ queue {name!r} keeps receiving messages or consumers: stop every producer and "
        "worker using it, then migrate again (its messages so far are safe in "
        f"{holding!r}, and the next run moves them back)"
    )


def _declare_with(connection: pika.BlockingConnection, name: str, arguments: dict[str, Any]) -> bool:
    """Declare ``name`` durable with ``arguments``; False when it exists with other arguments."""
    return _declare(connection, name, refused=PRECONDITION_FAILED, durable=True, arguments=arguments)


def _declare(connection: pika.BlockingConnection, name: str, *, refused: int, **kwargs: Any) -> bool:
    """``queue_declare`` on a channel of its own; False when the broker refuses it with the reply
    code ``refused`` (406: exists with other arguments; 404, for a passive declare: no such queue)."""
    channel = connection.channel()
    try:
        channel.queue_declare(name, **kwargs)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != refused:
            raise
        return False
    channel.close()
    return True


def _consumers(connection: pika.BlockingConnection, name: str) -> int:
    channel = connection.channel()
    frame = channel.queue_declare(name, passive=True)
    channel.close()
    return int(frame.method.consumer_count)


def _move(connection: pika.BlockingConnection, source: str, target: str) -> int:
    """Move every message of ``source`` to ``target``: publish (confirmed), then ack. Returns the count."""
    channel = connection.channel()
    channel.confirm_delivery()
    moved = 0
    try:
        while True:
            method, properties, body = channel.basic_get(source, auto_ack=False)
            if method is None:
                return moved
            channel.basic_publish(
                exchange="",
                routing_key=target,
                body=body,
                properties=pika.BasicProperties(
                    delivery_mode=2,
                    priority=amqp_priority(lane_of(_options(body))),
                    headers=properties.headers,
                ),
                mandatory=True,
            )
            channel.basic_ack(method.delivery_tag)
            moved += 1
    finally:
        if channel.is_open:
            channel.close()


def _options(body: bytes) -> dict[str, Any]:
    try:
        options = json.loads(body).get("options")
    except (ValueError, AttributeError):
        return {}
    return options if isinstance(options, dict) else {}
