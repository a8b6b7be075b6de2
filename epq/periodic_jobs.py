"""Periodic jobs: a schedule that enqueues a job of a kind at every tick, run by every worker.

A periodic job is declared in code (:func:`periodic`, in a module the workers import: one named
in ``EPQ_HANDLERS``) or in the settings (``EPQ_PERIODIC``). It names a kind (one of epq's five,
or any Dramatiq actor declared on the broker, such as an application's maintenance task), when
it ticks (``every``: an interval; ``cron``: a cron expression) and the request each tick
enqueues (fixed, or made from the tick's time by a function).

Every worker process runs a :class:`Ticker` thread (started at worker boot by the
:class:`Ticking` middleware, as the promoter of ``epq.schedule``). At a tick, each ticker
enqueues the tick's job through the one insert path (``epq.insert``; an actor of the
application's through ``broker.enqueue``), with a uniqueness lock of its own: the schedule's
name and the tick's time (``epq.options.PERIODIC``; ``Uniqueness.lock_for`` makes the key). Of
the processes that try a tick, exactly one enqueues it; the others are refused as duplicates.
Then each notes the tick in the schedule's state in the state store (``StateStore.periodic_*``),
so that a ticker that comes later (a restarted worker) starts after it:

- **Ticks.** An interval ticks at the multiples of ``every`` since the Unix epoch (every 30 min:
  at :00 and :30 UTC), on every host alike; a cron expression (5 fields, or 6 with seconds
  first; ``@hourly`` and the like) ticks in UTC or in the job's ``timezone``, with Debian
  cron's rules at DST changes (the ``cronsim`` package).
- **Restarts.** A worker that stops or is killed leaves the ticks to the others; one that starts
  goes on from the last tick noted. A tick is not enqueued twice (decision 58 in
  ``docs/decisions.md`` says the one narrow race that could), and none is skipped while any
  worker runs.
- **Missed ticks.** While no worker runs, nothing is enqueued. When one starts again, the ticks
  missed by less than :data:`CATCH_UP_MS` (a minute) are enqueued then, late, in order; older
  ones are dropped (logged), but for the latest tick due, which is always enqueued, once. A
  new schedule starts with the first tick after a worker first saw it.
- **State.** Per schedule: when a ticker first saw it (``since``), the last tick noted
  (``tick``), its job (``job``) and when it was noted (``at``); kept for
  :data:`STATE_TTL_MS` (or three periods) after the last tick, then forgotten like a new
  schedule's.

Times are milliseconds since the epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dramatiq
from cronsim import CronSim, CronSimError
from pydantic import BaseModel, TypeAdapter, ValidationError

from . import insert
from ._actor import EpqActor
from .backends.base import StateStore, note_moves
from .errors import ConfigurationError, DuplicateJob, InvalidRequest, describe_error
from .kinds import KINDS
from .models import _Request
from .options import PERIODIC, UNIQUE_KEY
from .outage import WorkerStopping, until_written

logger = logging.getLogger("epq.periodic")

#: Ticks missed by less than this (no worker ran) are enqueued late; older ones are dropped, but
#: for the latest tick due.
CATCH_UP_MS = 60_000
#: How often an idle ticker looks at its schedules at least (a new schedule, a clock that jumps:
#: ``epq_clock``); it wakes at each tick besides.
POLL_MS = 1_000
#: How long a schedule's state is kept after its last tick (at least three periods).
STATE_TTL_MS = 7 * 24 * 3600 * 1000
#: A tick's uniqueness lock holds at least this long (and two periods): a ticker that tries the
#: tick later than that, without seeing the tick noted, is not refused (see ``lock_ms``).
TICK_LOCK_MIN_MS = 10 * 60_000
#: The shortest interval.
MIN_EVERY_MS = 1_000

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
#: Cron's nicknames, as cron expressions.
NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

RequestFactory = Callable[[datetime], "Mapping[str, Any] | BaseModel"]
"""Makes a tick's request from the tick's time (an aware datetime in UTC)."""

_DURATION = TypeAdapter(timedelta)


class BadDeclaration(ValueError):
    """A periodic job's declaration cannot work: ``field`` names what is wrong."""

    def __init__(self, name: str, field: str, problem: str) -> None:
        self.name, self.field, self.problem = name, field, problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class PeriodicJob:
    """A declared periodic job (see :func:`periodic`). Two declarations are the same job when
    every attribute is equal (a request function: the same function)."""

    name: str
    kind: str
    every_ms: int | None = None
    cron: str | None = None
    timezone: str | None = None
    request: Mapping[str, Any] | BaseModel | RequestFactory | None = field(default=None, compare=False)
    #: The request as compared and shown (JSON of a fixed request; the function's name).
    request_text: str = ""

    @property
    def timing(self) -> str:
        """When it ticks, for people: ``every 30m`` or ``cron */30 * * * * (UTC)``."""
        if self.every_ms is not None:
            return f"every {_span(self.every_ms)}"
        return f"cron {self.cron} ({self.timezone or 'UTC'})"

    def next_after(self, ms: int) -> int | None:
        """The first tick after ``ms`` (None: the cron expression never matches again)."""
        if self.every_ms is not None:
            return (ms // self.every_ms + 1) * self.every_ms
        return self._cron_tick(ms // 1000, reverse=False)

    def latest_at_or_before(self, ms: int) -> int | None:
        """The last tick at or before ``ms`` (None: none)."""
        if self.every_ms is not None:
            return (ms // self.every_ms) * self.every_ms
        # (cronsim going back from a whole second gives the ticks before it)
        return self._cron_tick(ms // 1000 + 1, reverse=True)

    def ticks_between(self, after_ms: int, until_ms: int) -> Iterator[int]:
        """The ticks after ``after_ms`` up to ``until_ms`` (included), in order."""
        tick = self.next_after(after_ms)
        while tick is not None and tick <= until_ms:
            yield tick
            tick = self.next_after(tick)

    def _cron_tick(self, seconds: int, *, reverse: bool) -> int | None:
        assert self.cron is not None
        tz = ZoneInfo(self.timezone) if self.timezone else timezone.utc
        try:
            found = next(CronSim(self.cron, datetime.fromtimestamp(seconds, tz), reverse=reverse))
        except StopIteration:  # pragma: no cover - an expression that cronsim parses matches some day
            return None
        return int(found.timestamp()) * 1000

    def request_for(self, tick_ms: int) -> Mapping[str, Any] | BaseModel:
        """The request of the tick at ``tick_ms``."""
        request = self.request
        if request is None:
            return {}
        if isinstance(request, (Mapping, BaseModel)):
            return request
        return request(datetime.fromtimestamp(tick_ms / 1000, timezone.utc))

    def lock_ms(self, tick_ms: int) -> int:
        """How long the uniqueness lock of the tick at ``tick_ms`` holds."""
        following = self.next_after(tick_ms)
        period = (following - tick_ms) if following is not None else 0
        return max(TICK_LOCK_MIN_MS, 2 * period)

    def state_ttl_ms(self, tick_ms: int) -> int:
        """How long the schedule's state is kept after the tick at ``tick_ms``."""
        following = self.next_after(tick_ms)
        period = (following - tick_ms) if following is not None else 0
        return max(STATE_TTL_MS, 3 * period)


def _span(ms: int) -> str:
    """``90000`` -> ``1m30s``."""
    if ms % 1000:
        return f"{ms / 1000:g}s"
    seconds = ms // 1000
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts)


# ---- declaring ---------------------------------------------------------------------------------


def define(
    name: str,
    kind: str | dramatiq.Actor[Any, Any],
    *,
    every: timedelta | float | str | None = None,
    cron: str | None = None,
    timezone: str | None = None,
    request: Mapping[str, Any] | BaseModel | RequestFactory | None = None,
) -> PeriodicJob:
    """Check a declaration and make its :class:`PeriodicJob` (see :func:`periodic`).

    Raises:
      BadDeclaration: naming the field that is wrong.
    """
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadDeclaration(
            str(name), "name", f"{name!r} is not a schedule name (letters, digits, '_.:-', up to 100)"
        )
    actor_name = kind.actor_name if isinstance(kind, dramatiq.Actor) else kind
    if not isinstance(actor_name, str) or not actor_name:
        raise BadDeclaration(name, "kind", f"an epq kind or an actor's name, not {kind!r}")
    if (every is None) == (cron is None):
        raise BadDeclaration(name, "every", "give either every (an interval) or cron (an expression)")
    every_ms = None if every is None else _every_ms(name, every)
    if cron is not None:
        cron = _cron(name, cron)
    if timezone is not None:
        if cron is None:
            raise BadDeclaration(name, "timezone", "only a cron expression takes a timezone")
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise BadDeclaration(name, "timezone", f"unknown timezone {timezone!r}") from None
    request, text = _request(name, actor_name, request)
    return PeriodicJob(name, actor_name, every_ms, cron, timezone, request, text)


def _every_ms(name: str, every: timedelta | float | str) -> int:
    value: Any = every
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip())  # seconds
    if isinstance(value, bool):
        raise BadDeclaration(name, "every", f"an interval, not {every!r}")
    try:
        span = _DURATION.validate_python(value)
    except ValidationError:
        raise BadDeclaration(
            name, "every", f"an interval (seconds, a timedelta or an ISO-8601 duration), not {every!r}"
        ) from None
    ms = round(span.total_seconds() * 1000)
    if ms < MIN_EVERY_MS:
        raise BadDeclaration(name, "every", f"at least 1 second, not {span.total_seconds():g} s")
    return ms


def _cron(name: str, cron: str) -> str:
    if not isinstance(cron, str):
        raise BadDeclaration(name, "cron", f"a cron expression, not {cron!r}")
    expression = " ".join(cron.split())
    expression = NICKNAMES.get(expression.lower(), expression)
    try:
        CronSim(expression, datetime(2000, 1, 1, tzinfo=timezone.utc))
    except (CronSimError, ValueError) as exc:
        raise BadDeclaration(
            name, "cron", f"{cron!r} is not a cron expression ({exc}; 5 fields, or 6 with seconds first)"
        ) from None
    return expression


def _request(
    name: str, kind: str, request: Mapping[str, Any] | BaseModel | RequestFactory | None
) -> tuple[Mapping[str, Any] | BaseModel | RequestFactory | None, str]:
    """The request as kept (an epq kind's fixed request: validated into its model now), and its
    text."""
    if request is None:
        request = {}
    if callable(request) and not isinstance(request, (Mapping, BaseModel)):
        return request, f"{getattr(request, '__module__', '?')}.{getattr(request, '__qualname__', request)}()"
    if isinstance(request, BaseModel):
        body: Any = request.model_dump(mode="json", exclude_unset=True)
    elif isinstance(request, Mapping):
        body = dict(request)
    else:
        raise BadDeclaration(name, "request", f"a mapping, a request model or a function, not {request!r}")
    kept: Mapping[str, Any] | BaseModel = request
    spec = KINDS.get(kind)
    if spec is not None:
        if isinstance(request, BaseModel) and not isinstance(request, spec.model):
            raise BadDeclaration(name, "request", f"{kind} takes a {spec.model.__name__}")
        try:
            kept = request if isinstance(request, spec.model) else spec.model.model_validate(body)
        except ValidationError as exc:
            problem = InvalidRequest.from_validation_error(kind, exc).errors[0]
            raise BadDeclaration(name, f"request.{problem['field']}", problem["message"]) from None
        if kept.run_at is not None:
            raise BadDeclaration(name, "request.run_at", "a periodic job runs at its tick")
        body = kept.model_dump(mode="json", exclude_unset=True)
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadDeclaration(name, "request", f"not JSON: {exc}") from None
    return kept, text


_lock = threading.Lock()
_declared: dict[str, PeriodicJob] = {}


def periodic(
    name: str,
    kind: str | dramatiq.Actor[Any, Any],
    *,
    every: timedelta | float | str | None = None,
    cron: str | None = None,
    timezone: str | None = None,
    request: Mapping[str, Any] | BaseModel | RequestFactory | None = None,
) -> PeriodicJob:
    """Declare a periodic job: every worker process enqueues a job of ``kind`` at each tick,
    exactly once across them all (see the module docstring).

    Declare it in a module every worker imports (one named in ``EPQ_HANDLERS``)::

        epq.periodic("reindex-acme", "index_endpoint", every=timedelta(minutes=30),
                     request={"endpoint_id": ACME, "source": "INTERNAL"})
        epq.periodic("purge-old-indexings", purge_old_indexings, cron="0 * * * *")

    Parameters:
      name: the schedule's name (letters, digits, ``_.:-``): its ticks' uniqueness and its state
        go by it, so renaming a schedule starts it afresh.
      kind: an epq kind, or a Dramatiq actor (or its name) declared on the broker.
      every: the interval (a ``timedelta``, seconds, or an ISO-8601 duration; 1 s at least):
        ticks at its multiples since the Unix epoch.
      cron: a cron expression instead (5 fields, or 6 with seconds first; ``@hourly`` and the
        like), in UTC or in ``timezone`` (an IANA name).
      request: what each tick enqueues: an epq kind's request (a model or a mapping of its
        fields, checked now), an actor's keyword arguments, or a function that makes it from the
        tick's time (an aware datetime).

    Declaring the same job again is harmless; another job under a name taken raises.

    Raises:
      ConfigurationError: the declaration cannot work (the message names the field), or the
        name is taken by another job.
    """
    try:
        job = define(name, kind, every=every, cron=cron, timezone=timezone, request=request)
    except BadDeclaration as exc:
        raise ConfigurationError(f"periodic job {exc.name!r}: {exc}") from None
    with _lock:
        current = _declared.get(job.name)
        if current is not None and current != job:
            raise ConfigurationError(
                f"periodic job {job.name!r} is declared already ({current.kind}, {current.timing}); "
                "give this one another name"
            )
        _declared[job.name] = job
    return job


def declared() -> list[PeriodicJob]:
    """The periodic jobs declared in code in this process, by name."""
    with _lock:
        return [_declared[name] for name in sorted(_declared)]


@contextlib.contextmanager
def isolated_declarations() -> Iterator[None]:
    """Run a block that may declare periodic jobs, forgetting them afterwards (tests)."""
    with _lock:
        saved = dict(_declared)
    try:
        yield
    finally:
        with _lock:
            _declared.clear()
            _declared.update(saved)


def from_settings(value: Any) -> dict[str, PeriodicJob]:
    """``EPQ_PERIODIC``: a JSON object of name -> ``{"kind", "every" | "cron", "timezone",
    "request"}`` (or that object already decoded), as periodic jobs.

    Raises:
      ValueError: naming the schedule and the field that is wrong.
    """
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError('a JSON object of schedules: {"name": {"kind": ..., "every" or "cron": ...}}')
    jobs: dict[str, PeriodicJob] = {}
    for name, spec in value.items():
        if isinstance(spec, PeriodicJob):
            jobs[name] = spec
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"{name}: an object with kind and every or cron, not {spec!r}")
        unknown = sorted(set(spec) - {"kind", "every", "cron", "timezone", "request"})
        if unknown:
            raise ValueError(f"{name}.{unknown[0]}: not a field (kind, every, cron, timezone, request)")
        if "kind" not in spec:
            raise ValueError(f"{name}.kind: required")
        try:
            jobs[name] = define(
                name,
                spec["kind"],
                every=spec.get("every"),
                cron=spec.get("cron"),
                timezone=spec.get("timezone"),
                request=spec.get("request"),
            )
        except BadDeclaration as exc:
            raise ValueError(f"{name}.{exc}") from None
    return jobs


# ---- ticking -----------------------------------------------------------------------------------


def due_ticks(job: PeriodicJob, cursor_ms: int, now_ms: int) -> list[int]:
    """The ticks of ``job`` to enqueue at ``now_ms`` when the last one handled is ``cursor_ms``:
    those after it missed by less than :data:`CATCH_UP_MS`, else the latest one due alone."""
    latest = job.latest_at_or_before(now_ms)
    if latest is None or latest <= cursor_ms:
        return []
    recent = list(job.ticks_between(max(cursor_ms, now_ms - CATCH_UP_MS), now_ms))
    return recent or [latest]


def tick_tag(name: str, tick_ms: int) -> str:
    """The ``epq.options.PERIODIC`` option of a tick's job: its schedule and tick."""
    return f"{name}@{tick_ms}"


def enqueue_tick(
    broker: dramatiq.Broker, store: StateStore, job: PeriodicJob, tick_ms: int
) -> tuple[str, bool]:
    """Enqueue the job of ``job``'s tick at ``tick_ms``, unless another process did: return its
    job id, and whether this call enqueued it.

    Raises:
      ConfigurationError: ``job``'s kind is not an actor of the broker.
      InvalidRequest: the tick's request fails its checks (nothing is enqueued).
      BrokerUnavailable: as an insert does.
    """
    actor = broker.actors.get(job.kind)
    if actor is None:
        raise ConfigurationError(f"periodic job {job.name!r}: kind: no actor {job.kind!r} on the broker")
    # the tick's own uniqueness lock (``Uniqueness.lock_for`` makes its key from the tag)
    options: dict[str, Any] = {PERIODIC: tick_tag(job.name, tick_ms), "unique_for": job.lock_ms(tick_ms)}
    request = job.request_for(tick_ms)
    try:
        if isinstance(actor, EpqActor):
            model = _validated(actor, request)
            job_id = insert.insert_one(actor, model, broker, **options).message.message_id
            note_moves()
            return job_id, True
        # an actor of the application's: ``Uniqueness`` takes the lock as it is enqueued
        kwargs = request.model_dump(mode="json") if isinstance(request, BaseModel) else dict(request)
        message = actor.message_with_options(kwargs=kwargs, **options)
        try:
            broker.enqueue(message)
        except DuplicateJob:
            raise
        except BaseException:
            key = message.options.get(UNIQUE_KEY)
            if key:  # the lock its publish took: the tick is free again
                with contextlib.suppress(Exception):
                    store.release_unique(key, message.message_id)
            raise
        note_moves()
        return message.message_id, True
    except DuplicateJob as duplicate:
        return duplicate.existing_job_id, False


def _validated(actor: EpqActor, request: Mapping[str, Any] | BaseModel) -> _Request:
    """The request of an epq kind's tick as its model (a function's: checked now)."""
    if isinstance(request, actor.kind.model):
        return request
    if isinstance(request, BaseModel):
        request = request.model_dump(mode="json", exclude_unset=True)
    return actor.validate(kwargs=dict(request))


@dataclass(frozen=True)
class Tick:
    """A tick a ticker handled."""

    name: str
    tick_ms: int
    #: The tick's job ('' when its request failed its checks and nothing was enqueued).
    job_id: str
    #: This ticker enqueued it (else another process had).
    enqueued: bool


class Ticks:
    """A ticker's passes: each enqueues the ticks due (:meth:`run`). Remembers, between passes,
    the last tick handled of each schedule, so that a pass with nothing due reads nothing."""

    def __init__(self) -> None:
        self.cursors: dict[str, int] = {}
        self._logged: dict[str, int] = {}  # schedule -> the last tick whose failure was logged

    def run(
        self, broker: dramatiq.Broker, store: StateStore, jobs: Sequence[PeriodicJob]
    ) -> tuple[list[Tick], int | None]:
        """Enqueue every tick due of ``jobs`` (by the store's clock); return the ticks handled and
        when the next one is due."""
        now = store.now_ms()
        due = [job for job in jobs if self._maybe_due(job, now)]
        handled: list[Tick] = []
        if due:
            states = store.periodic_states([job.name for job in due])
            for job, state in zip(due, states, strict=True):
                handled += self._run_one(broker, store, job, state, now)
        nexts = [job.next_after(max(now, self.cursors.get(job.name, now))) for job in jobs]
        return handled, min((n for n in nexts if n is not None), default=None)

    def _maybe_due(self, job: PeriodicJob, now: int) -> bool:
        cursor = self.cursors.get(job.name)
        if cursor is None:
            return True  # (its state is read first)
        latest = job.latest_at_or_before(now)
        return latest is not None and latest > cursor

    def _run_one(
        self, broker: dramatiq.Broker, store: StateStore, job: PeriodicJob, state: Mapping[str, str], now: int
    ) -> list[Tick]:
        handled: list[Tick] = []
        tick = None
        try:
            if not state.get("since") and not state.get("tick"):
                cursor = store.periodic_begin(job.name, now, job.state_ttl_ms(now))
            else:
                cursor = max(int(state.get("since") or 0), int(state.get("tick") or 0))
            self.cursors[job.name] = cursor
            ticks = due_ticks(job, cursor, now)
            for tick in ticks:
                try:
                    job_id, enqueued = enqueue_tick(broker, store, job, tick)
                except InvalidRequest as exc:  # it cannot go; the next ticks may
                    self._log_failure(job, tick, f"its request failed its checks: {exc}", trace=False)
                    job_id, enqueued = "", False
                until_written(
                    lambda t=tick, j=job_id: store.periodic_mark(job.name, t, j, now, job.state_ttl_ms(t)),  # type: ignore[misc]
                    "noting a periodic job's tick",
                )
                self.cursors[job.name] = tick
                handled.append(Tick(job.name, tick, job_id, enqueued))
                if enqueued and tick == ticks[0]:
                    _log_missed(job, cursor, tick)
        except WorkerStopping:
            raise
        except Exception as exc:
            self._log_failure(job, tick, describe_error(exc), trace=not isinstance(exc, ConfigurationError))
        return handled

    def _log_failure(self, job: PeriodicJob, tick: int | None, problem: str, *, trace: bool) -> None:
        """Log a failure once per schedule and tick (a ticker tries a failed tick again each pass)."""
        key = tick if tick is not None else -1
        if self._logged.get(job.name) == key:
            return
        self._logged[job.name] = key
        when = "" if tick is None else f" tick {_utc(tick)}"
        logger.error("Periodic job %s%s: %s; trying again", job.name, when, problem, exc_info=trace)


def _log_missed(job: PeriodicJob, cursor: int, first: int) -> None:
    """Say which ticks were dropped before ``first`` (no worker ran), if any."""
    missed = job.next_after(cursor)
    last_missed = job.latest_at_or_before(first - 1)
    if missed is not None and last_missed is not None and missed < first:
        logger.warning(
            "Periodic job %s: its ticks from %s to %s were missed while no worker ran, and are "
            "dropped (more than %d s late); enqueueing the tick of %s",
            job.name, _utc(missed), _utc(last_missed), CATCH_UP_MS // 1000, _utc(first),
        )  # fmt: skip


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Ticker:
    """A daemon thread that enqueues the ticks of the periodic jobs until stopped: at each tick,
    and every :data:`POLL_MS` at least."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        store: StateStore,
        jobs: Callable[[], Sequence[PeriodicJob]],
        *,
        poll_ms: int = POLL_MS,
    ) -> None:
        self.broker = broker
        self.store = store
        self.jobs = jobs
        self.poll_ms = poll_ms
        self.ticks = Ticks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epq-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait_ms = self.poll_ms
            try:
                _, next_ms = self.ticks.run(self.broker, self.store, self.jobs())
                if next_ms is not None:
                    wait_ms = min(wait_ms, max(1, next_ms - self.store.now_ms()))
            except WorkerStopping:
                pass  # (the worker stops: so does this thread)
            except Exception:
                logger.exception("Enqueueing periodic jobs failed; trying again in 1 s")
                wait_ms = 1000
            self._stop.wait(wait_ms / 1000)


class Ticking(dramatiq.Middleware):
    """Runs a :class:`Ticker` in every worker process of the broker (from boot to shutdown).

    Parameters:
      store: the state store (the schedules' state; its clock).
      configured: the periodic jobs of the settings (``EPQ_PERIODIC``); they take the place of
        jobs of the same name declared in code.
    """

    def __init__(self, store: StateStore, configured: Mapping[str, PeriodicJob] | None = None) -> None:
        self.store = store
        self.configured = dict(configured or {})
        self._tickers: dict[int, Ticker] = {}
        self._lock = threading.Lock()
        self._reported: set[tuple[str, str]] = set()

    def jobs(self) -> list[PeriodicJob]:
        """Every periodic job: declared in code (in this process, so far) or in the settings."""
        merged = {job.name: job for job in declared()}
        merged.update(self.configured)
        return [merged[name] for name in sorted(merged)]

    def problems(self, broker: dramatiq.Broker) -> dict[str, str]:
        """The periodic jobs that cannot run on ``broker``, and why."""
        return {
            job.name: f"kind: no actor {job.kind!r} on the broker (an epq kind, or an actor a handler "
            "module declares)"
            for job in self.jobs()
            if job.kind not in broker.actors
        }

    def usable(self, broker: dramatiq.Broker) -> list[PeriodicJob]:
        """The periodic jobs that can run on ``broker``; each other one is logged once."""
        problems = self.problems(broker)
        for name, problem in problems.items():
            if (name, problem) not in self._reported:
                self._reported.add((name, problem))
                logger.error("Periodic job %s is not run: %s", name, problem)
        return [job for job in self.jobs() if job.name not in problems]

    def run_due(self, broker: dramatiq.Broker) -> list[Tick]:
        """Enqueue the ticks due now (one pass, in the calling thread: ``epq.testing.drain``)."""
        return Ticks().run(broker, self.store, self.usable(broker))[0]

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        ticker = Ticker(broker, self.store, lambda: self.usable(broker))
        with self._lock:
            self._tickers[id(worker)] = ticker
        ticker.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        with self._lock:
            ticker = self._tickers.pop(id(worker), None)
        if ticker is not None:
            ticker.stop()


# ---- what operators see ------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """A periodic job as ``epq periodic`` shows it."""

    name: str
    kind: str
    timing: str
    request: str
    #: When its next tick is (None: never again): a tick due and not enqueued yet (no worker
    #: runs, or it failed) when ``due``.
    next_ms: int | None
    due: bool
    #: The last tick noted and its job ('' when its request failed its checks).
    last_tick_ms: int | None
    last_job_id: str | None
    #: Why it cannot run on this broker (None: it can).
    problem: str | None


def status(broker: dramatiq.Broker, ticking: Ticking) -> list[Status]:
    """Every periodic job with its next and last tick (one read of the state store)."""
    jobs = ticking.jobs()
    problems = ticking.problems(broker)
    now = ticking.store.now_ms()
    states = ticking.store.periodic_states([job.name for job in jobs]) if jobs else []
    out = []
    for job, state in zip(jobs, states, strict=True):
        cursor = max(int(state.get("since") or 0), int(state.get("tick") or 0))
        pending = due_ticks(job, cursor, now) if cursor else []
        last = int(state["tick"]) if state.get("tick") else None
        out.append(
            Status(
                name=job.name,
                kind=job.kind,
                timing=job.timing,
                request=job.request_text,
                next_ms=pending[0] if pending else job.next_after(now),
                due=bool(pending),
                last_tick_ms=last,
                last_job_id=state.get("job") if last is not None else None,
                problem=problems.get(job.name),
            )
        )
    return out
