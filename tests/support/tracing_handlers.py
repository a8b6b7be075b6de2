"""The tracing tests' handler module for worker processes (``EPQ_HANDLERS``): sets up an
OpenTelemetry SDK whose spans go, as JSON, onto ``<EPQ_TEST_RESULTS_KEY>:spans`` in the results
Redis, and registers ``metrics_jobs.run_job`` for ``register_job``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import epq
from tests.support.metrics_jobs import run_job, span_json

_client = redis.Redis.from_url(os.environ["EPQ_TEST_RESULTS_URL"])
_key = os.environ["EPQ_TEST_RESULTS_KEY"] + ":spans"


class RedisExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            _client.rpush(_key, json.dumps(span_json(span)))
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(RedisExporter()))
trace.set_tracer_provider(provider)
epq.handler("register_job")(run_job)
