"""Fixtures of the RabbitMQ tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from epq.settings import reset_settings


@pytest.fixture
def serial_keys_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Serial keys on for every kind, set before the broker is."""
    monkeypatch.setenv("EPQ_SERIAL_KINDS", "all")
    reset_settings()
    yield
    monkeypatch.undo()
    reset_settings()
