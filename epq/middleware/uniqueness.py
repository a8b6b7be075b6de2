"""``Uniqueness``: one job per kind and unique key inside the kind's window."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from json.encoder import encode_basestring
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy

from .. import metrics
from ..backends.base import Holder, StateStore, holder_id, unique_lock_key
from ..errors import DuplicateJob
from ..options import PERIODIC, PRIORITY, RECORDED, UNIQUE_KEY
from ..outage import state_errors, written_if_possible
from .common import enqueue_hook_errors, option

logger = logging.getLogger("epq")

# Sorted keys, compact, unescaped: the unique fields' canonical form (changing it would change
# every lock key).
_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


#: unique_by -> its names sorted, each with its JSON key (``"name":``), as the canonical form has them.
_HEADS: dict[tuple[str, ...], list[tuple[str, str]]] = {}


def _flat_canonical(unique_by: Sequence[str], kwargs: dict[str, Any]) -> str | None:
    """``_canonical_json`` of the unique fields when each value is a string, an int or None (the
    usual case, a few times faster: the names are sorted and quoted once per kind), else None."""
    names = unique_by if type(unique_by) is tuple else tuple(unique_by)
    heads = _HEADS.get(names)
    if heads is None:
        if not all(type(name) is str for name in names):
            return None
        heads = _HEADS[names] = [(name, encode_basestring(name) + ":") for name in sorted(set(names))]
    parts = []
    for name, head in heads:
        value = kwargs.get(name)
        if type(value) is str:
            parts.append(head + encode_basestring(value))
        elif type(value) is int:
            parts.append(head + int.__repr__(value))
        elif value is None:
            parts.append(head + "null")
        else:
            return None
    return "{" + ",".join(parts) + "}"


#: The "fields" a periodic job's tick is unique by: its ``PERIODIC`` option (schedule and tick).
_TICK_FIELDS = (PERIODIC,)


def count_refused(store: StateStore, message: dramatiq.Message[Any]) -> None:
    """Count ``message``'s enqueue, refused as a duplicate, in ``epq_duplicates_refused_total``;
    but for a periodic job's tick (``PERIODIC``) that another worker enqueued first: that is how a
    tick goes once, not a duplicate the application sent."""
    if PERIODIC not in message.options:
        metrics.duplicates_refused(store, message.actor_name)


class Uniqueness(dramatiq.Middleware):
    """Uniqueness windows: one job per kind and unique key inside the window.

    Actor options (a message option of the same name wins for ``unique_for``):
      unique_for(int): the window in milliseconds; 0 or absent turns uniqueness off.
      unique_by(tuple[str, ...]): the payload fields that make up the key; a periodic job's
        tick (message option ``epq.options.PERIODIC``) is unique by its schedule and tick instead,
        for any actor (``epq.periodic_jobs``).

    A new job takes its lock as it is inserted (``epq.insert``, or ``JobRecords`` for an epq
    message enqueued by hand: with its record, in one round trip; ``epq.setup`` adds both); this
    middleware takes it in ``before_enqueue`` for any other message of an actor with a window
    (a dead job run again, say). The lock holds for ``unique_for`` plus the job's delay. A job's
    own retries and promotions carry the lock's key (``epq.options.UNIQUE_KEY``) and pass. The
    lock is released when the job is dead-lettered (``after_nack``) or skipped; after success it
    holds until the window ends.
    """

    #: Acts on unplanned messages only: an insert need not call its enqueue hook.
    epq_skips_planned = True

    def __init__(self, store: StateStore) -> None:
        self.store = store

    @property
    def actor_options(self) -> set[str]:
        return {"unique_for", "unique_by"}

    @staticmethod
    def key_for(actor_name: str, unique_by: Sequence[str], kwargs: dict[str, Any]) -> str:
        """The lock key of a payload: kind plus a digest of the unique fields (canonical JSON)."""
        canonical = _flat_canonical(unique_by, kwargs)
        if canonical is None:
            canonical = _canonical_json({name: kwargs.get(name) for name in unique_by})
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:40]
        return unique_lock_key(actor_name, digest)

    @classmethod
    def _window(cls, broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> tuple[int, str] | None:
        """``(unique_for, lock key)`` of ``message``, or None when it has no uniqueness. A periodic
        job's tick (``PERIODIC``, with its own ``unique_for``) is unique by its schedule and tick,
        whatever its actor's unique fields."""
        actor = broker.actors.get(message.actor_name)
        if actor is None:
            return None
        unique_for = option(message, actor, "unique_for")
        if not unique_for:
            return None
        tick = message.options.get(PERIODIC)
        if tick is not None:
            return int(unique_for), cls.key_for(message.actor_name, _TICK_FIELDS, {PERIODIC: tick})
        unique_by = actor.options.get("unique_by")
        if not unique_by:
            return None
        return int(unique_for), cls.key_for(message.actor_name, unique_by, message.kwargs)

    def lock_key(self, broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> str | None:
        """The key ``message`` locks, or None when it has no uniqueness."""
        window = self._window(broker, message)
        return None if window is None else window[1]

    def lock_for(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message[Any],
        delay: int | None,
        *,
        holder: bool = True,
    ) -> tuple[str, str, int] | None:
        """The lock ``message`` needs: ``(key, holder value, ttl ms)``, or None without uniqueness
        (``holder=False``: '' for the holder value, for a caller that makes it itself).

        The holder value records the job id, its creation and due times, queue and priority, so
        that a duplicate can be answered with the holder's details even without its record.
        """
        window = self._window(broker, message)
        if window is None:
            return None
        window_ms, key = window
        delay_ms = int(delay or 0)
        value = ""
        if holder:
            tail = self.holder_tail(message, self.store.now_ms() + delay_ms)
            value = message.message_id + tail
        return key, value, window_ms + delay_ms

    @staticmethod
    def holder_tail(message: dramatiq.Message[Any], due_ms: int) -> str:
        """The holder value of ``message``'s lock after its id (see ``Holder``)."""
        priority = message.options.get(PRIORITY, "")
        return Holder.tail(message.message_timestamp, due_ms, message.queue_name, priority)

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        options = message.options
        if UNIQUE_KEY in options:
            return  # a job that took its lock as it was inserted, or its retry or promotion
        actor = broker.actors.get(message.actor_name)
        recorded = actor is not None and "max_attempts" in actor.options
        if recorded and RECORDED not in options and _records_take_locks(broker):
            return  # an epq job enqueued by hand: JobRecords takes its lock with its record
        with enqueue_hook_errors("taking the uniqueness lock", message):
            self._take_lock(broker, message, delay)

    def _take_lock(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        lock = self.lock_for(broker, message, delay)
        if lock is None:
            return
        key, holder, lock_ttl = lock
        with state_errors("taking a uniqueness lock"):
            current = self.store.acquire_unique(key, holder, lock_ttl)
        if current is not None:
            count_refused(self.store, message)
            raise DuplicateJob(message.actor_name, holder_id(current), holder=current)
        message.options[UNIQUE_KEY] = key

    def release(self, message: dramatiq.Message[Any] | MessageProxy, key: str | None = None) -> bool:
        """Free the lock ``message`` holds (a no-op when another job holds the key)."""
        key = key or message.options.get(UNIQUE_KEY)
        if not key:
            return False
        return self.store.release_unique(key, message.message_id)

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if written_if_possible(lambda: self.release(message), "releasing a uniqueness lock"):
            logger.info(
                "Released the uniqueness lock of dead-lettered %s job %s",
                message.actor_name,
                message.message_id,
            )

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        written_if_possible(lambda: self.release(message), "releasing a uniqueness lock")


def _records_take_locks(broker: dramatiq.Broker) -> bool:
    """Whether the broker has a middleware that takes the lock of an epq message enqueued by hand
    with its record (``JobRecords``: ``epq.setup`` adds both)."""
    return any(getattr(middleware, "epq_writes_records", False) for middleware in broker.middleware)
