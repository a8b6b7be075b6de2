"""With the OpenTelemetry API installed but no tracer provider set, tracing is idle: an insert
does not emit the enqueue signals for it (they would cost every enqueue and make no span); once
a provider is set, it does."""

from __future__ import annotations

import dramatiq
import pytest

from epq.settings import reset_settings
from epq.tracing import Tracing

pytest.importorskip("opentelemetry")


@pytest.fixture
def traced_broker(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> dramatiq.Broker:
    monkeypatch.setenv("EPQ_TRACING", "1")
    reset_settings()
    broker: dramatiq.Broker = request.getfixturevalue("epq_broker")
    return broker


def tracing_of(broker: dramatiq.Broker) -> Tracing:
    return next(m for m in broker.middleware if isinstance(m, Tracing))


def test_idle_tracing_is_not_among_the_hooks_an_insert_emits(
    traced_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracing = tracing_of(traced_broker)
    monkeypatch.setattr(tracing, "configured", lambda: False)
    assert tracing not in traced_broker.foreign_hooks("before_enqueue")  # type: ignore[attr-defined]
    assert tracing not in traced_broker.foreign_hooks("after_enqueue")  # type: ignore[attr-defined]


def test_tracing_with_a_provider_set_gets_the_enqueue_signals(
    traced_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracing = tracing_of(traced_broker)
    monkeypatch.setattr(tracing, "configured", lambda: False)
    assert tracing not in traced_broker.foreign_hooks("before_enqueue")  # type: ignore[attr-defined]
    monkeypatch.setattr(tracing, "configured", lambda: True)  # the application set one since
    assert tracing in traced_broker.foreign_hooks("before_enqueue")  # type: ignore[attr-defined]
    assert tracing in traced_broker.foreign_hooks("after_enqueue")  # type: ignore[attr-defined]
