"""EpqSettings: the EPQ_ environment, read once."""

from __future__ import annotations

from datetime import timedelta

import pytest

import epq
from epq.settings import EpqSettings, default_state_dir, get_settings, reset_settings


def test_defaults() -> None:
    settings = EpqSettings(broker_url=None)
    assert settings.queues == ["default", "execution", "events", "maintenance"]
    assert settings.handlers == []
    assert settings.index_unique_for == timedelta(minutes=15)
    assert settings.register_unique_for == timedelta(minutes=5)
    assert settings.index_time_limit == timedelta(minutes=2)  # River's (the Go package's) defaults
    assert settings.register_time_limit == timedelta(minutes=1)
    assert settings.completed_retention == timedelta(hours=24)
    assert settings.discarded_retention == timedelta(days=7)
    assert settings.completed_max == 10_000
    assert settings.dead_max == 10_000
    assert settings.strict_payload_kinds == []


def test_environment_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_HANDLERS", "app.jobs, app.more ,")
    monkeypatch.setenv("EPQ_QUEUES", "default,events,default")
    monkeypatch.setenv("EPQ_INDEX_UNIQUE_FOR", "90")
    monkeypatch.setenv("EPQ_REGISTER_UNIQUE_FOR", "PT2M30S")
    monkeypatch.setenv("EPQ_STATE_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("EPQ_COMPLETED_MAX", "0")
    monkeypatch.setenv("EPQ_DEAD_MAX", "500")
    monkeypatch.setenv("EPQ_INDEX_TIME_LIMIT", "300")
    monkeypatch.setenv("EPQ_REGISTER_TIME_LIMIT", "PT30S")
    monkeypatch.setenv("EPQ_STRICT_PAYLOAD_KINDS", "register_job, index_endpoint")
    settings = get_settings()
    assert settings.handlers == ["app.jobs", "app.more"]
    assert settings.queues == ["default", "events"]
    assert settings.index_unique_for == timedelta(seconds=90)
    assert settings.register_unique_for == timedelta(minutes=2, seconds=30)
    assert settings.state_url == "redis://127.0.0.1:6379/3"
    assert settings.completed_max == 0
    assert settings.dead_max == 500
    assert settings.index_time_limit == timedelta(minutes=5)
    assert settings.register_time_limit == timedelta(seconds=30)
    assert settings.strict_payload_kinds == ["register_job", "index_endpoint"]


def test_settings_are_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    monkeypatch.setenv("EPQ_HANDLERS", "changed.later")
    assert get_settings() is first
    reset_settings()
    assert get_settings().handlers == ["changed.later"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EPQ_INDEX_UNIQUE_FOR", "soon"),
        ("EPQ_REGISTER_UNIQUE_FOR", "-5"),
        ("EPQ_QUEUES", " , "),
        ("EPQ_COMPLETED_MAX", "-1"),
        ("EPQ_COMPLETED_MAX", "many"),
        ("EPQ_DEAD_MAX", "-1"),
        ("EPQ_DEAD_MAX", "1.5"),
        ("EPQ_INDEX_TIME_LIMIT", "0"),
        ("EPQ_REGISTER_TIME_LIMIT", "a minute"),
        ("EPQ_STRICT_PAYLOAD_KINDS", "register_job,register_thing"),
    ],
)
def test_a_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(epq.ConfigurationError, match=name):
        get_settings()


def test_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert str(default_state_dir()) == f"{tmp_path}/epq"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert str(default_state_dir()).endswith(".local/state/epq")
