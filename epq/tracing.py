"""OpenTelemetry traces: with OpenTelemetry installed (``pip install epq[otel]``) and configured
by the application, every enqueue makes a producer span (``send <queue>``) and carries its
context in the message (option ``epq_trace``, W3C trace context); each attempt of the job runs in
a consumer span (``process <queue>``) whose parent is that producer span, on every broker,
through retries and delayed runs (the context stays in the message). Names and attributes follow
OpenTelemetry's messaging conventions. Until the application sets a tracer provider, nothing is
done (OpenTelemetry's API would record nothing anyway).

OpenTelemetry is loaded by name (:data:`OTEL_API`) when :class:`Tracing` is made, which
``epq.setup`` does only when ``EPQ_TRACING`` says so or, unset, when the package is installed:
without it, nothing is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy

from .options import PRIORITY, TRACE_CONTEXT

#: The OpenTelemetry API package, loaded by name on first use.
OTEL_API = "opentelemetry"
#: The producer spans of enqueues that did not finish (a duplicate, a broker error) are dropped
#: past this many, unfinished, so that they cannot pile up.
PENDING_MAX = 10_000
#: ``messaging.system``: the messages are Dramatiq's, on whichever broker.
SYSTEM = "dramatiq"


def available() -> bool:
    """Whether the OpenTelemetry API is installed (without importing it)."""
    try:
        return importlib.util.find_spec(OTEL_API) is not None
    except (ImportError, ValueError):  # (hidden, or half-removed)
        return False


def wanted(setting: bool | None) -> bool:
    """Whether to trace: ``EPQ_TRACING``, or when unset, whether OpenTelemetry is installed."""
    return available() if setting is None else setting


_active: ContextVar[tuple[Any, Any] | None] = ContextVar("epq_consumer_span", default=None)


class Tracing(dramatiq.Middleware):
    """Producer spans at enqueue, consumer spans around each attempt (see the module docstring).
    First among the broker's middleware, so that the consumer span is current for the whole
    processing of the message (its ``after_*`` hooks run last)."""

    def __init__(self) -> None:
        self._trace = importlib.import_module(OTEL_API + ".trace")
        self._propagate = importlib.import_module(OTEL_API + ".propagate")
        self._context = importlib.import_module(OTEL_API + ".context")
        self._tracer = self._trace.get_tracer("epq")
        self._pending: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._configured = False

    def configured(self) -> bool:
        """Whether the application has set a tracer provider (the SDK's, say): until it does,
        OpenTelemetry's spans record nothing, and epq makes none."""
        if not self._configured:
            proxy = getattr(self._trace, "ProxyTracerProvider", ())
            self._configured = not isinstance(self._trace.get_tracer_provider(), proxy)
        return self._configured

    def epq_idle(self) -> bool:
        """Whether enqueues can skip this middleware for now (no tracer provider yet: see
        ``DurableDelays.foreign_hooks``)."""
        return not self.configured()

    @staticmethod
    def _attributes(message: Any, operation: str) -> dict[str, Any]:
        return {
            "messaging.system": SYSTEM,
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": message.queue_name,
            "messaging.message.id": message.message_id,
            "epq.job.kind": message.actor_name,
            "epq.job.priority": int(message.options.get(PRIORITY) or 0),
        }

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        if TRACE_CONTEXT in message.options or not self.configured():
            return  # (a retry, or a promotion from the schedule: the job's trace goes on)
        span = self._tracer.start_span(
            f"send {message.queue_name}",
            kind=self._trace.SpanKind.PRODUCER,
            attributes=self._attributes(message, "send"),
        )
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=self._trace.set_span_in_context(span))
        message.options[TRACE_CONTEXT] = carrier
        with self._lock:
            self._pending[message.message_id] = span
            while len(self._pending) > PENDING_MAX:
                self._pending.popitem(last=False)

    def after_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        with self._lock:
            span = self._pending.pop(message.message_id, None)
        if span is not None:
            span.end()

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if not self.configured():
            return
        parent = self._propagate.extract(message.options.get(TRACE_CONTEXT) or {})
        attributes = self._attributes(message, "process")
        attributes["epq.job.attempt"] = int(message.options.get("retries", 0)) + 1
        span = self._tracer.start_span(
            f"process {message.queue_name}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
        token = self._context.attach(self._trace.set_span_in_context(span))
        _active.set((span, token))

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        active = _active.get()
        if active is None:
            return
        span, token = active
        _active.set(None)
        if exception is not None:
            span.record_exception(exception)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, type(exception).__name__))
        span.end()
        self._context.detach(token)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self.after_process_message(broker, message)
