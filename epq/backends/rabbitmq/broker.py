"""The RabbitMQ broker: Dramatiq's, with epq's durable delays and priority queues.

Imported only when a RabbitMQ URL is used (``epq.backends.factory.build_broker`` picks it by
scheme), so that
a process on Redis or the stub broker never loads pika or Dramatiq's RabbitMQ broker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import dramatiq
import pika
import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer, _RabbitmqMessage
from dramatiq.common import dq_name, q_name
from dramatiq.errors import ConnectionClosed

from ... import serial, wire
from ...errors import BrokerUnavailable, QueueMismatch, StateUnavailable, describe_error
from ...middleware.job_records import made_available, refuse_malformed
from ...outage import GivesBack, WorkerStopping, backoff_ms, must_requeue, unreachable, until_written
from ...pausing import PAUSED_POLL_MS, PausableConsumer
from ...priority import BROKER_PRIORITY, RABBITMQ_MAX_PRIORITY, amqp_priority, lane_of
from ..base import DurableDelays, Move, in_flight, schedule_message
from ..urls import mask_url

logger = logging.getLogger("epq")

#: AMQP reply code for a queue declared again with different arguments.
PRECONDITION_FAILED = 406


#: A consumer's published hand-overs wait at most this long, once RabbitMQ confirmed them, before
#: their claims are forgotten (with the next flush of acks, when one comes sooner).
FORGET_AFTER_S = 0.02
#: How long a consumer that closes waits for the confirms of the hand-overs it published.
CONFIRMS_AT_CLOSE_S = 5.0
#: At most this many hand-overs of one consumer wait for their confirms; more go through the
#: hand-over threads (RabbitMQ blocking the connection in an alarm: what waits stays small, so
#: that a publish never blocks the consumer's thread on a full socket).
UNCONFIRMED_MAX = 50
#: After the publisher's connection failed, or was closed while RabbitMQ blocked it, hand-overs
#: go through the hand-over threads for this long before it is opened again.
REOPEN_AFTER_S = 10.0


class HandOverPublisher:
    """Publishes the next jobs of the serial keys a consumer releases in its flush
    (``epq.serial.release_at_ack``), on the consumer's thread, without waiting for RabbitMQ.

    On a connection of its own, opened on first use: a consumer's connection never publishes
    (RabbitMQ stops reading from a publishing connection in a memory or disk alarm, and the
    consumer's acks would wait behind it). The channel is in confirm mode, but nothing waits
    for a confirm: the consumer pumps this connection (:meth:`pump`) as it goes, the confirms are
    taken as they come, and the claims of the confirmed messages (:meth:`take_confirmed`) are
    forgotten with the consumer's next flush. The flush first has the records of the messages
    it will publish (:meth:`accept`) made available, as a promotion does.

    Goes through the process's hand-over threads (``epq.serial.hand_over``, which publish with
    the broker's ``enqueue``) instead: a message RabbitMQ refuses or returns as unroutable (its
    queue was deleted: ``enqueue`` declares it); every message while RabbitMQ blocks this
    connection (an alarm), while :data:`UNCONFIRMED_MAX` wait for their confirms, for
    :data:`REOPEN_AFTER_S` after the connection failed, after :meth:`close`, or while another
    middleware than epq's listens to enqueues (``DurableDelays.foreign_hooks``: it sees each
    hand-over then). A message whose confirm never comes (the connection is lost) stays claimed:
    a promoter publishes it when its lease ends, as for a worker that dies; one RabbitMQ read
    late (an alarm longer than the lease) is published twice. The connection's heartbeats go
    with the consumer's polls (every ``worker_timeout``, a second by default)."""

    def __init__(self, broker: Any, on_confirmed: Any) -> None:
        self.broker, self._on_confirmed = broker, on_confirmed
        self._connection: Any = None
        self._blocking: Any = None  # its channel
        self._channel: Any = None  # pika's channel under it, in confirm mode
        self._published = 0  # the delivery tag of the last publish on the channel
        self._accepted: list[tuple[str, bytes, dramatiq.Message[Any]]] = []  # to publish
        self._unconfirmed: dict[int, tuple[str, bytes]] = {}  # delivery tag -> claimed
        self._returned: set[str] = set()  # entries returned as unroutable, not confirmed yet
        self._confirmed: list[str] = []  # entries to forget
        self._blocked = False  # RabbitMQ blocks the connection (an alarm)
        self._reopen_at = 0.0  # (time.monotonic) not before, after a failure
        self._closed = False

    @property
    def waiting(self) -> bool:
        """Whether published messages wait for their confirms."""
        return bool(self._unconfirmed)

    def accept(self, claimed: tuple[str, bytes]) -> bool:
        """Take a claimed ``(entry, message)`` to publish; False when it must go through
        ``enqueue`` instead."""
        if self._closed or self._blocked or len(self._unconfirmed) + len(self._accepted) >= UNCONFIRMED_MAX:
            return False
        if self._connection is None and time.monotonic() < self._reopen_at:
            return False
        if self.broker.foreign_hooks("before_enqueue") or self.broker.foreign_hooks("after_enqueue"):
            return False
        try:
            message = with_amqp_priority(dramatiq.Message.decode(claimed[1]))
        except Exception:  # (the hand-over threads try it, and say why it fails)
            return False
        self._accepted.append((*claimed, message))
        return True

    def accepted_ids(self) -> list[str]:
        """The job ids of the messages accepted and not yet published."""
        return [message.message_id for _, _, message in self._accepted]

    def drop_accepted(self) -> None:
        """Forget the accepted messages (a consumer that closes before their records were made
        available: they stay claimed, and a promoter publishes them when their lease ends)."""
        self._accepted = []

    def publish_accepted(self) -> None:
        """Publish the accepted messages, without waiting for their confirms."""
        accepted, self._accepted = self._accepted, []
        for i, (entry, data, message) in enumerate(accepted):
            try:
                channel = self._open()
                channel.basic_publish(
                    exchange="",
                    routing_key=q_name(message.queue_name),
                    body=message.encode(),
                    properties=pika.BasicProperties(
                        delivery_mode=2, priority=message.options.get(BROKER_PRIORITY), message_id=entry
                    ),
                    mandatory=True,  # (an unroutable one is returned, then confirmed)
                )
            except (pika.exceptions.AMQPError, OSError) as exc:
                logger.warning("Could not publish serial hand-overs on their own connection: %s",
                               describe_error(exc))  # fmt: skip
                self._drop(failed=True)
                for entry_left, data_left, _ in accepted[i:]:
                    serial.hand_over(self.broker, (entry_left, data_left))
                return
            self._published += 1
            self._unconfirmed[self._published] = (entry, data)
        self.pump()

    def pump(self) -> None:
        """Send what is published and take the confirms that came (the consumer's thread calls
        this as it goes, and it keeps the connection's heartbeats)."""
        if self._connection is None:
            return
        try:
            self._connection.process_data_events(time_limit=0)
        except (pika.exceptions.AMQPError, OSError) as exc:
            logger.warning("The connection of serial hand-overs was lost: %s", describe_error(exc))
            self._drop(failed=True)

    def take_confirmed(self) -> list[str]:
        """The entries of the messages RabbitMQ confirmed since the last call."""
        confirmed, self._confirmed = self._confirmed, []
        return confirmed

    def put_back(self, confirmed: list[str]) -> None:
        """Keep what :meth:`take_confirmed` gave for the next call (the flush could not forget them)."""
        self._confirmed[:0] = confirmed

    def close(self, timeout_s: float = CONFIRMS_AT_CLOSE_S) -> None:
        """Wait for the confirms of what was published (up to ``timeout_s``), then close; later
        hand-overs go through ``enqueue``."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while self._unconfirmed and self._connection is not None and time.monotonic() < deadline:
            try:
                self._connection.process_data_events(time_limit=0.01)
            except (pika.exceptions.AMQPError, OSError):
                break
        self._drop()

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self._drop(failed=self._channel is not None)  # (a channel RabbitMQ closed)
            self._connection = pika.BlockingConnection(parameters=self.broker.parameters)
            self._connection.add_on_connection_blocked_callback(partial(self._set_blocked, True))
            self._connection.add_on_connection_unblocked_callback(partial(self._set_blocked, False))
            self._blocking = self._connection.channel()
            # pika's channel under the blocking one: its publishes and confirms do not wait
            channel = self._blocking._impl
            channel.confirm_delivery(partial(self._on_confirm, channel))
            channel.add_on_return_callback(self._on_return)
            self._channel, self._published = channel, 0
        return self._channel

    def _drop(self, *, failed: bool = False) -> None:
        """Close and forget the connection (what was not confirmed ends with its lease); after
        a failure, or while RabbitMQ blocked it, not opened again for :data:`REOPEN_AFTER_S`."""
        if self._unconfirmed:
            logger.warning("%d serial hand-overs were not confirmed before their connection closed",
                           len(self._unconfirmed))  # fmt: skip
        if failed or self._blocked:
            self._reopen_at = time.monotonic() + REOPEN_AFTER_S
        connection = self._connection
        self._unconfirmed.clear()
        self._returned.clear()
        self._connection = self._blocking = self._channel = None
        self._blocked = False
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):  # (already broken)
                connection.close()

    def _set_blocked(self, blocked: bool, *_args: Any) -> None:
        self._blocked = blocked

    def _on_return(self, _channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
        self._returned.add(properties.message_id)

    def _on_confirm(self, channel: Any, frame: Any) -> None:
        if channel is not self._channel:
            return  # (a channel closed since)
        method = frame.method
        if method.multiple:
            tags = [tag for tag in self._unconfirmed if tag <= method.delivery_tag]
        else:
            tags = [method.delivery_tag]
        confirmed = isinstance(method, pika.spec.Basic.Ack)
        for tag in tags:
            found = self._unconfirmed.pop(tag, None)
            if found is None:
                continue
            entry, data = found
            if confirmed and entry not in self._returned:
                self._confirmed.append(entry)
            else:
                self._returned.discard(entry)
                serial.hand_over(self.broker, (entry, data))
        if self._confirmed:
            self._on_confirmed()


class EpqRabbitmqConsumer(PausableConsumer, GivesBack, _RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer, checking each message as it comes off the queue
    (``epq.wire``: a malformed one is recorded and dead-lettered with its reason, instead of
    reaching the worker's threads), and giving back (``basic_nack`` with requeue) a message the
    worker could not finish because the state store was unreachable (``epq.outage``).

    The records of jobs that succeeded are completed in batches: ``ack`` (in a worker thread)
    keeps the job's outcome (``InFlight.outcome``) and has the connection's thread flush what
    is kept: the serial keys of those jobs released in one round trip
    (``epq.serial.release_at_ack``), the outcomes written in another (``RecordStore.move_many``)
    with the records of the next jobs of those keys, the next jobs published
    (:class:`HandOverPublisher`), then the messages acked. A flush asked for while one runs
    follows it; so the jobs that end while the state store answers go in the next batch, and a
    job alone waits for nothing. While the state store cannot be reached, the outcomes stay kept
    and their messages unacked (the outage rule): the flush is tried again with
    ``epq.outage``'s backoff, without blocking the connection's thread (which keeps the
    heartbeats going); if the worker stops or the connection is lost first, RabbitMQ gives the
    messages back to their queue, to run again.

    While its queue is paused (``epq.pausing``), its AMQP consumer is cancelled (the messages
    delivered into pika's buffer go back to the queue, to their place), and the connection's
    events are still processed (heartbeats; the acks of the jobs still running); a new AMQP
    consumer starts when the queue is resumed.
    """

    def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout / 1000
        self.cancelled = False  # the AMQP consumer was cancelled while the queue was paused
        backend = self.broker.epq
        self.records = backend.records if backend is not None else None
        self._lock = threading.Lock()
        # (delivery tag, outcome, (serial key, job id) to release or None), in ack order
        self._kept: list[tuple[int, Move, tuple[str, str] | None]] = []
        self._flushing = False  # a flush is asked for or running
        self._failed_flushes = 0  # in a row, the state store unreachable
        self.hand_overs = HandOverPublisher(self.broker, self._forget_soon)
        self._forget_timer = False  # a flush for confirmed hand-overs is due (FORGET_AFTER_S)

    def next_message(self) -> Any:
        self.hand_overs.pump()
        try:
            method, _properties, body = next(self.iterator)
            if method is None:
                return None
        except (AssertionError, pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
            # (as Dramatiq's: a queue that disappeared is declared again when the consumer restarts)
            if getattr(exc, "reply_code", None) == 404:
                self.broker.queues_pending.add(q_name(self.queue_name))
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        try:
            message = wire.decode(body, self.broker.actors)
        except wire.MalformedMessage as exc:
            try:
                refuse_malformed(self.broker, self.queue_name, exc)
            except StateUnavailable as unavailable:
                self.logger.warning("%s; giving it back for later", unavailable)
                self._settle(method.delivery_tag, requeue=True)
                self.connection.sleep(wire.REFUSE_RETRY_MS / 1000)  # (pika's sleep keeps heartbeats going)
                return None
            self._settle(method.delivery_tag, requeue=False)  # to .XQ, by the dead-letter exchange
            return None
        self.known_tags.add(method.delivery_tag)
        proxy = _RabbitmqMessage(method.redelivered, method.delivery_tag, message)  # type: ignore[no-untyped-call]
        if self.records is not None:
            in_flight(proxy).batched = True  # see JobRecords
        return proxy

    def wait_paused(self) -> None:
        try:
            if not self.cancelled:
                self.cancelled = True
                self.channel.cancel()  # (rejects, to be requeued, what pika holds undelivered)
            self.connection.sleep(PAUSED_POLL_MS / 1000)  # (pika's sleep processes the events)
            self.hand_overs.pump()
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def resume_fetching(self) -> None:
        if self.cancelled:
            self.cancelled = False
            self.iterator = self.channel.consume(self.queue_name, inactivity_timeout=self.timeout_s)

    def ack(self, message: Any) -> None:
        flight = in_flight(message)
        outcome = flight.outcome
        release = None if flight.serial_key is None else (flight.serial_key, message.message_id)
        if outcome is None or must_requeue(message):
            if release is not None and not must_requeue(message):  # (an outcome not batched)
                release_now = partial(serial.release_at_ack, self.broker, [release])
                try:
                    until_written(release_now, "releasing a serial key")
                except WorkerStopping:
                    self.give_back(message)  # (it runs again, still the head of its key)
                    return
            super().ack(message)  # (GivesBack: or back to its queue)
            return
        try:
            self.known_tags.remove(message._tag)
        except KeyError:  # (the consumer restarted since: RabbitMQ gives the message back by itself)
            self.logger.warning("Failed to ack message: not in known tags.")
            return
        with self._lock:
            self._kept.append((message._tag, outcome, release))
            if self._flushing:
                return  # the flush running or asked for takes it
            self._flushing = True
        self._flush_soon()

    def _flush_soon(self) -> None:
        try:
            self.connection.add_callback_threadsafe(self._flush)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
            with self._lock:
                self._flushing = False  # (what is kept is given back with the connection)
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def _forget_soon(self) -> None:
        """Have the claims of confirmed hand-overs forgotten soon (on the connection's thread)."""
        if not self._forget_timer:
            self._forget_timer = True
            try:
                self.connection.call_later(FORGET_AFTER_S, self._forget_now)
            except Exception:  # (its connection is closed or lost: close() forgets them)
                self._forget_timer = False

    def _forget_now(self) -> None:
        self._forget_timer = False
        self._flush()

    def _flush(self) -> None:
        """On the connection's thread: release the serial keys of the kept jobs (forgetting the
        claims of the hand-overs confirmed since the last flush), write their outcomes and the
        records of the next jobs, publish those, then ack the messages."""
        assert self.records is not None
        with self._lock:
            batch, self._kept = self._kept, []
        forget = self.hand_overs.take_confirmed()
        if not batch and not forget:
            with self._lock:
                self._flushing = bool(self._kept)
            if self._flushing:
                self._flush_soon()
            return
        unwritten = self._write(batch, forget)
        if unwritten is not None:
            self._flush_later(batch, forget, unwritten)  # (written again: the same state)
            return
        if self._failed_flushes:
            logger.warning("The state store is back; acking %d completed jobs", len(batch))
            self._failed_flushes = 0
        if batch:
            *others, (last, _, _) = batch
            for tag, _, _ in others:
                self.channel._impl.basic_ack(tag)  # (pika's channel under the blocking one: no flush)
            self.channel.basic_ack(last)  # sends them all
        with self._lock:
            self._flushing = bool(self._kept)
        if self._flushing:
            self._flush_soon()

    def _write(
        self, batch: list[tuple[int, Move, tuple[str, str] | None]], forget: list[str]
    ) -> Exception | None:
        """Release the serial keys of ``batch``'s jobs and forget the claims ``forget`` (one round
        trip), write the outcomes and make the records of the next jobs available (another),
        then publish the next jobs. Returns the error when the state store cannot be reached
        (all of it can be written again: a key released already is not released twice, and the
        next jobs it claimed stay accepted, to be published once the outcomes are written)."""
        assert self.records is not None
        releases = [release for _, _, release in batch if release is not None]
        try:  # (epq.serial: before the acks)
            serial.release_at_ack(self.broker, releases, forget=forget, publish=self.hand_overs.accept)
        except Exception as exc:
            if unreachable(exc):
                return exc
            logger.exception("Could not release the serial keys of %d completed jobs", len(releases))
        try:
            next_jobs = [made_available(job_id) for job_id in self.hand_overs.accepted_ids()]
            self.records.move_many([outcome for _, outcome, _ in batch] + next_jobs)
        except Exception as exc:
            if unreachable(exc):  # (the next jobs wait with the batch: published after its outcomes)
                return exc
            # a state store that answers but cannot take it (a bug): acked as they would be
            logger.exception("Could not write the records of %d completed jobs", len(batch))
        self.hand_overs.publish_accepted()
        return None

    def _flush_later(
        self,
        batch: list[tuple[int, Move, tuple[str, str] | None]],
        forget: list[str],
        exc: Exception,
    ) -> None:
        """Keep the outcomes (their messages unacked) and flush again after a backoff."""
        with self._lock:
            self._kept[:0] = batch
            self._flushing = True  # (the flush below takes what is kept meanwhile)
        self.hand_overs.put_back(forget)
        if self._failed_flushes == 0:
            logger.warning(
                "The state store is unreachable while completing %d jobs (%s); their messages "
                "wait, unacked, until it is back",
                len(batch),
                describe_error(exc),
            )
        self.connection.call_later(backoff_ms(self._failed_flushes) / 1000, self._flush)
        self._failed_flushes += 1

    def close(self) -> None:
        """Wait for the confirms of the hand-overs this consumer published and forget their
        claims (else a promoter would publish them again when their lease ends), then close."""
        if self.records is not None:
            self._settle_hand_overs()
        super().close()  # type: ignore[no-untyped-call]

    def _settle_hand_overs(self) -> None:
        try:
            self._run_callbacks()  # (the flushes asked for: they may publish more)
        except Exception as exc:  # (the connection is lost: its messages come back anyway)
            self.logger.debug("Could not run the flushes asked for before closing: %s", describe_error(exc))
        self.hand_overs.drop_accepted()  # (a flush that could not write: they wait for their lease)
        self.hand_overs.close()  # (waits for the confirms; later hand-overs go through enqueue)
        forget = self.hand_overs.take_confirmed()
        if forget and self._write([], forget) is not None:
            self.logger.warning("The state store is unreachable: %d serial hand-overs will be published "
                                "again when their lease ends", len(forget))  # fmt: skip

    def _run_callbacks(self) -> None:
        """Run the callbacks other threads asked the connection's thread for so far."""
        done = threading.Event()
        self.connection.add_callback_threadsafe(done.set)
        while not done.is_set():
            self.connection.sleep(0)

    def _settle(self, tag: int, *, requeue: bool) -> None:
        self.connection.add_callback_threadsafe(partial(self.channel.basic_nack, tag, requeue=requeue))

    def give_back(self, message: Any) -> None:
        try:
            self.known_tags.remove(message._tag)
            self._settle(message._tag, requeue=True)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        except KeyError:
            pass  # (the consumer restarted since: RabbitMQ gives the message back by itself)


def with_amqp_priority(message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
    """``message`` with the AMQP priority of its lane (``epq.priority.lane_of``: its epq priority,
    else a plain actor's own ``broker_priority`` brought into epq's four), so that RabbitMQ orders
    it as the other brokers do."""
    wanted = amqp_priority(lane_of(message.options))
    if message.options.get(BROKER_PRIORITY) == wanted:
        return message
    return message.copy(options={BROKER_PRIORITY: wanted})


class EpqRabbitmqBroker(DurableDelays, RabbitmqBroker):
    """Dramatiq's RabbitMQ broker with epq's durable delays and priority queues.

    Queues are declared with ``x-max-priority`` and every message carries its lane's AMQP
    priority. RabbitMQ cannot add that argument to an existing queue: declaring a queue that
    exists without it fails with a :class:`~epq.errors.QueueMismatch` (a ``ConfigurationError``)
    that says how to migrate.
    """

    #: The driver's errors an enqueue maps to ``BrokerUnavailable`` (see
    #: ``epq.backends.errors.unreachable_errors``).
    epq_driver_errors: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError,)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_priority", RABBITMQ_MAX_PRIORITY)
        super().__init__(**kwargs)

    @property
    def consumer_class(self) -> type[EpqRabbitmqConsumer]:
        return EpqRabbitmqConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        return super().consume(queue_name, self.prefetch_for(queue_name, prefetch), timeout)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        # declared (and checked) before a delayed message goes to the schedule too, so that a
        # queue without epq's arguments is refused at the call site, not later in a promoter
        self.declare_queue(q_name(message.queue_name), ensure=True)
        return super().enqueue(with_amqp_priority(message), delay=delay)

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

    def join_queue(self, queue_name: str, timeout_ms: int) -> None:
        # RabbitMQ's counts lag: the queue must be seen empty several times in a row
        self.join_broker(queue_name, min_successes=3, idle_time=50, timeout=timeout_ms)

    def _prepare_immediate(self, message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        self.declare_queue(message.queue_name, ensure=True)
        return with_amqp_priority(message)

    def _publish_batch(self, items: Sequence[tuple[dramatiq.Message[Any], int | None]]) -> None:
        """Delayed messages go to the schedule first, then the rest in one AMQP transaction; if
        the transaction fails, the schedule entries are taken back."""
        store = self.epq_store
        scheduled: list[str] = []
        try:
            for message, due in items:
                if due is not None:
                    assert store is not None
                    scheduled.append(schedule_message(store, message, due))
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
                                delivery_mode=2, priority=message.options.get(BROKER_PRIORITY)
                            ),
                        )
                    channel.tx_commit()
                finally:
                    if channel.is_open:
                        channel.close()
        except BaseException as exc:
            if isinstance(exc, (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)):
                del self.connection  # as Dramatiq's enqueue does: the next call connects again
            if scheduled and store is not None:
                store.schedule_remove(scheduled)
            raise

    def check_queues(self, queue_names: Iterable[str]) -> None:
        """Declare ``queue_names`` on the server now (a worker calls this at boot), so that a
        queue declared without epq's arguments fails loudly instead of in a consumer thread."""
        for name in queue_names:
            self.declare_queue(name, ensure=True)

    def purge_dead_letters(self, queues: Iterable[str]) -> None:
        """Empty RabbitMQ's dead-letter queues (``<queue>.XQ``) of ``queues``."""
        for queue in queues:
            self.channel.queue_purge(f"{queue}.XQ")

    def count_dead_letters(self, queues: Iterable[str]) -> dict[str, int]:
        """How many messages the dead-letter queue (``<queue>.XQ``) of each of ``queues`` holds."""
        return {
            queue: int(self.channel.queue_declare(f"{queue}.XQ", passive=True).method.message_count)
            for queue in queues
        }


def connect(url: str, *, middleware: list[dramatiq.Middleware], timeout_s: float) -> EpqRabbitmqBroker:
    """The broker for an ``amqp://`` or ``amqps://`` URL, its connection opened (``timeout_s``
    for the socket), so that an unreachable server or bad credentials fail here.

    Raises:
      BrokerUnavailable: the server cannot be reached or refused the credentials (URL masked).
    """
    broker = EpqRabbitmqBroker(url=url, confirm_delivery=True, middleware=middleware)
    params = broker.parameters
    for p in params if isinstance(params, list) else [params]:
        p.socket_timeout = timeout_s
        p.blocked_connection_timeout = 30
    try:
        broker.connection  # noqa: B018 - opens this thread's connection
    except pika.exceptions.ProbableAuthenticationError as exc:
        raise BrokerUnavailable(f"RabbitMQ at {mask_url(url)} refused the credentials") from exc
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {mask_url(url)}: {describe_error(exc)}") from exc
    return broker
