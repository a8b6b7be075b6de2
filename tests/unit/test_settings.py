"""EpqSettings: the EPQ_ environment, read once."""

from __future__ import annotations

from datetime import timedelta

import pytest

import epq
from epq.kinds import KINDS
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
    # the Go package's worker budget per queue (jobs at once in one worker process)
    assert settings.queue_budgets == {"default": 10, "execution": 5, "events": 20, "maintenance": 2}


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
        ("EPQ_SERIAL_KINDS", "register_thing"),
        ("EPQ_SERIAL_CONTINUE_ON_FAILURE", "all,register_job"),
        ("EPQ_INDEX_UNIQUE_MODE", "latest"),
        ("EPQ_REGISTER_UNIQUE_MODE", "REPLACE"),
        ("EPQ_INDEX_DEBOUNCE_DELAY", "0"),
        ("EPQ_REGISTER_DEBOUNCE_MAX_WAIT", "-1"),
        ("EPQ_INDEX_DEBOUNCE_MAX_WAIT", "10"),  # (shorter than the delay, 30 s)
        ("EPQ_QUEUE_CONCURRENCY", "default"),
        ("EPQ_QUEUE_CONCURRENCY", "=3"),
        ("EPQ_QUEUE_CONCURRENCY", "default="),
        ("EPQ_QUEUE_CONCURRENCY", "default=0"),
        ("EPQ_QUEUE_CONCURRENCY", "default=-1"),
        ("EPQ_QUEUE_CONCURRENCY", "default=many"),
        ("EPQ_QUEUE_CONCURRENCY", "default=1.5"),
        ("EPQ_QUEUE_CONCURRENCY", "default=1,default=2"),
        ("EPQ_QUEUE_CONCURRENCY", "default=2,reports=3"),
    ],
)
def test_a_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(epq.ConfigurationError, match=name):
        get_settings()


def test_serial_kinds_are_named_or_all(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_settings().serial_kinds == []  # off unless named
    monkeypatch.setenv("EPQ_SERIAL_KINDS", "all")
    monkeypatch.setenv("EPQ_SERIAL_CONTINUE_ON_FAILURE", "register_job, register_source")
    reset_settings()
    assert get_settings().serial_kinds == list(KINDS)
    assert get_settings().serial_continue_on_failure == ["register_job", "register_source"]


def test_queue_concurrency_names_queues_over_the_go_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_QUEUE_CONCURRENCY", " default = 2 , events=30,")
    settings = get_settings()
    assert settings.queue_budgets == {"default": 2, "execution": 5, "events": 30, "maintenance": 2}
    # the same given as a keyword argument
    assert EpqSettings(queue_concurrency={"maintenance": 1}).queue_budgets["maintenance"] == 1


def test_a_queue_the_go_package_does_not_have_gets_10_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_QUEUES", "default,bulk,reports")
    monkeypatch.setenv("EPQ_QUEUE_CONCURRENCY", "reports=3")
    assert get_settings().queue_budgets == {"default": 10, "bulk": 10, "reports": 3}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("default", "'default' is not QUEUE=JOBS"),
        ("default=0", "must be 1 or more, not default=0"),
        ("default=many", "'default=many': the number of jobs must be a whole number"),
        ("default=1, default=2", "queue 'default' is named twice"),
        ("default=2,reports=3", "reports: not among the queues epq serves (EPQ_QUEUES=default,execution,"),
    ],
)
def test_a_bad_queue_concurrency_says_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("EPQ_QUEUE_CONCURRENCY", value)
    with pytest.raises(epq.ConfigurationError, match="EPQ_QUEUE_CONCURRENCY") as error:
        get_settings()
    assert says in str(error.value)


def test_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert str(default_state_dir()) == f"{tmp_path}/epq"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert str(default_state_dir()).endswith(".local/state/epq")


def test_a_debounce_max_wait_shorter_than_the_delay_says_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_REGISTER_DEBOUNCE_DELAY", "PT2M")
    monkeypatch.setenv("EPQ_REGISTER_DEBOUNCE_MAX_WAIT", "60")
    with pytest.raises(epq.ConfigurationError) as error:
        get_settings()
    assert "EPQ_REGISTER_DEBOUNCE_MAX_WAIT: " in str(error.value)
    assert "at least EPQ_REGISTER_DEBOUNCE_DELAY (120 s), not 60 s" in str(error.value)


def test_uniqueness_modes_default_to_keep_first(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    assert (settings.index_unique_mode, settings.register_unique_mode) == ("keep_first", "keep_first")
    monkeypatch.setenv("EPQ_INDEX_UNIQUE_MODE", "debounce")
    reset_settings()
    assert get_settings().index_unique_mode == "debounce"
