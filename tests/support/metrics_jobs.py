"""The job of the metrics tests (registered by ``metrics_handlers`` in worker processes, by the
test itself in process): a ``register_job`` job whose ``job_metadata`` holds
``{"fail": "once"}`` fails its first attempt (retried 50 ms later), ``{"fail": "discard"}`` is
discarded at once (``epq.InvalidPayload`` is among the actor's ``throws``); the others succeed.
And ``span_json``: what the tracing tests compare of a span."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage
from opentelemetry.sdk.trace import ReadableSpan

import epq

#: The retry delay of a job that fails once, ms (the stub's drain waits for retries due this soon).
RETRY_MS = 50


def run_job(request: Any) -> None:
    fail = request.job_metadata.get("fail")
    message = CurrentMessage.get_current_message()
    if fail == "once" and not message.options.get("retries"):
        raise dramatiq.Retry("failing once on purpose", delay=RETRY_MS)
    if fail == "discard":
        raise epq.InvalidPayload("discarded on purpose")


def span_json(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": context.trace_id,
        "span_id": context.span_id,
        "parent_id": span.parent.span_id if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
    }
