"""The RabbitMQ broker: Dramatiq's, with epq's durable delays and priority queues.

Imported only when a RabbitMQ URL is used (``epq.backends.factory.build_broker`` picks it by
scheme), so that
a process on Redis or the stub broker never loads pika or Dramatiq's RabbitMQ broker.
"""

from __future__ import annotations

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


class HandOverChannel:
    """A channel of a consumer's connection that publishes the next jobs of the serial keys the
    consumer releases in its flush (``epq.serial.release_at_ack``), with publisher confirms taken
    as they come instead of waited for: no thread hand-off, no wait in the flush. The claims of
    the messages RabbitMQ confirmed (:meth:`take_confirmed`) are forgotten, and the jobs' records
    made available, with the consumer's next flush. A message RabbitMQ refuses or returns as
    unroutable (its queue is gone) goes to the process's hand-over threads
    (``epq.serial.hand_over``), which publish through the broker's ``enqueue``. A message whose
    confirm never comes (the connection is lost) stays claimed: a promoter publishes it when its
    lease ends, as for a worker that dies. When another middleware than epq's listens to enqueues
    (``DurableDelays.foreign_hooks``), every hand-over goes through ``enqueue`` instead, so that
    it sees them."""

    def __init__(self, broker: Any, connection: Any, on_confirmed: Any) -> None:
        self.broker, self.connection, self._on_confirmed = broker, connection, on_confirmed
        self._blocking: Any = None  # the channel (opened on first use)
        self._channel: Any = None  # pika's channel under it, in confirm mode
        self._published = 0  # the delivery tag of the last publish on the channel
        # delivery tag -> (entry, message, job id) published and not confirmed yet
        self._unconfirmed: dict[int, tuple[str, bytes, str]] = {}
        self._returned: set[str] = set()  # entries returned as unroutable, not confirmed yet
        self._confirmed: list[tuple[str, str]] = []  # (entry, job id) to forget

    @property
    def waiting(self) -> bool:
        """Whether published messages wait for their confirms."""
        return bool(self._unconfirmed)

    def publish(self, claimed: tuple[str, bytes]) -> bool:
        """Publish a claimed ``(entry, message)`` (on the connection's thread); False when it must
        go through ``enqueue`` instead."""
        if self.broker.foreign_hooks("before_enqueue") or self.broker.foreign_hooks("after_enqueue"):
            return False
        entry, data = claimed
        message = with_amqp_priority(dramatiq.Message.decode(data))
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
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
            logger.warning("Could not publish a serial hand-over on its consumer's connection: %s",
                           describe_error(exc))  # fmt: skip
            self._channel = None
            return False
        self._published += 1
        self._unconfirmed[self._published] = (entry, data, message.message_id)
        return True

    def take_confirmed(self) -> list[tuple[str, str]]:
        """The ``(entry, job id)`` of the messages RabbitMQ confirmed since the last call."""
        confirmed, self._confirmed = self._confirmed, []
        return confirmed

    def put_back(self, confirmed: list[tuple[str, str]]) -> None:
        """Keep what :meth:`take_confirmed` gave for the next call (the flush could not forget them)."""
        self._confirmed[:0] = confirmed

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            if self._unconfirmed:  # (their claims end with their lease)
                logger.warning("%d serial hand-overs were not confirmed before their channel closed",
                               len(self._unconfirmed))  # fmt: skip
            self._unconfirmed.clear()
            self._returned.clear()
            # pika's channel under a blocking one: its publishes and confirms do not wait
            self._blocking = self.connection.channel()
            channel = self._blocking._impl
            channel.confirm_delivery(self._on_confirm)
            channel.add_on_return_callback(self._on_return)
            self._channel, self._published = channel, 0
        return self._channel

    def _on_return(self, _channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
        self._returned.add(properties.message_id)

    def _on_confirm(self, frame: Any) -> None:
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
            entry, data, job_id = found
            if confirmed and entry not in self._returned:
                self._confirmed.append((entry, job_id))
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
    is kept: the outcomes written in one round trip (``RecordStore.move_many``), the serial keys
    of those jobs released in another (``epq.serial.release_at_ack``), then their messages
    acked. A flush asked for while one runs follows it; so the jobs that end while the state
    store answers go in the next batch, and a job alone waits for nothing. While the state
    store cannot be reached, the outcomes stay kept and their messages unacked (the outage rule):
    the flush is tried again with ``epq.outage``'s backoff, without blocking the connection's
    thread (which keeps the heartbeats going); if the worker stops or the connection is lost
    first, RabbitMQ gives the messages back to their queue, to run again.

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
        self.hand_overs = HandOverChannel(self.broker, self.connection, self._forget_soon)
        self._forget_timer = False  # a flush for confirmed hand-overs is due (FORGET_AFTER_S)

    def next_message(self) -> Any:
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
            self.connection.call_later(FORGET_AFTER_S, self._forget_now)

    def _forget_now(self) -> None:
        self._forget_timer = False
        self._flush()

    def _flush(self) -> None:
        """On the connection's thread: write the kept outcomes, release the serial keys of their
        jobs and publish the next jobs (forgetting the claims of those published before, and
        making their records available), then ack the messages."""
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
        self, batch: list[tuple[int, Move, tuple[str, str] | None]], forget: list[tuple[str, str]]
    ) -> Exception | None:
        """Write the outcomes of ``batch`` and release its jobs' serial keys (publishing the next
        jobs); make the records of the confirmed hand-overs ``forget`` available and forget their
        claims. Returns the error when the state store cannot be reached (all of it can be
        written again)."""
        assert self.records is not None
        try:
            self.records.move_many(
                [outcome for _, outcome, _ in batch] + [made_available(job_id) for _, job_id in forget]
            )
        except Exception as exc:
            if unreachable(exc):
                return exc
            # a state store that answers but cannot take it (a bug): acked as they would be
            logger.exception("Could not write the records of %d completed jobs", len(batch))
        releases = [release for _, _, release in batch if release is not None]
        try:
            serial.release_at_ack(  # (epq.serial: before the acks)
                self.broker, releases, forget=[entry for entry, _ in forget], publish=self.hand_overs.publish
            )
        except Exception as exc:
            if unreachable(exc):
                return exc
            logger.exception("Could not release the serial keys of %d completed jobs", len(releases))
        return None

    def _flush_later(
        self,
        batch: list[tuple[int, Move, tuple[str, str] | None]],
        forget: list[tuple[str, str]],
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
            if self.hand_overs.waiting:
                self._run_callbacks()  # (flushes asked for: they may publish more)
                deadline = time.monotonic() + CONFIRMS_AT_CLOSE_S
                while self.hand_overs.waiting and time.monotonic() < deadline:
                    self.connection.process_data_events(time_limit=0.01)
        except Exception as exc:  # (a connection lost: what was not confirmed ends with its lease)
            self.logger.debug("Could not wait for the confirms of serial hand-overs: %s", describe_error(exc))
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
