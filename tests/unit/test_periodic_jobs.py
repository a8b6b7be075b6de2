"""Periodic jobs without a server: declarations and their errors, ``EPQ_PERIODIC``, when ticks
fall (intervals, cron expressions, time zones), and which missed ticks a ticker enqueues."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

import epq
from epq.periodic_jobs import (
    CATCH_UP_MS,
    TICK_LOCK_MIN_MS,
    PeriodicJob,
    declared,
    define,
    due_ticks,
    isolated_declarations,
)
from epq.settings import get_settings, reset_settings
from tests.support.helpers import ENDPOINT

INDEX = {"endpoint_id": ENDPOINT, "source": "INTERNAL"}
S = 1000
MIN = 60 * S
HOUR = 60 * MIN


def ms(text: str, tz: str = "UTC") -> int:
    """Milliseconds since the epoch of a local time ``YYYY-MM-DD HH:MM:SS`` in ``tz``."""
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp() * 1000)


@pytest.fixture(autouse=True)
def _forget_declarations() -> Iterator[None]:
    with isolated_declarations():
        yield


# ---- declaring ---------------------------------------------------------------------------------


def test_a_declaration_is_kept_with_its_request_checked_into_the_kinds_model() -> None:
    job = epq.periodic("reindex", "index_endpoint", every=timedelta(minutes=30), request=INDEX)
    assert job.every_ms == 30 * MIN
    assert isinstance(job.request, epq.EnqueueIndexEndpointRequest)
    assert job.request.source is epq.EndpointIndexSource.INTERNAL
    assert job.timing == "every 30m"
    assert declared() == [job]


def test_declaring_the_same_job_again_is_harmless_and_another_under_its_name_is_refused() -> None:
    epq.periodic("reindex", "index_endpoint", every=1800, request=INDEX)
    epq.periodic("reindex", "index_endpoint", every=timedelta(minutes=30), request=INDEX)
    with pytest.raises(epq.ConfigurationError, match="'reindex' is declared already"):
        epq.periodic("reindex", "index_endpoint", every=60, request=INDEX)
    assert len(declared()) == 1


@pytest.mark.parametrize(
    ("kwargs", "field", "text"),
    [
        ({"name": "has space"}, "name", "is not a schedule name"),
        ({"kind": ""}, "kind", "an epq kind or an actor's name"),
        ({"every": None}, "every", "either every"),
        ({"cron": "* * * * *"}, "every", "either every"),
        ({"every": 0.5}, "every", "at least 1 second"),
        ({"every": "soon"}, "every", "an interval"),
        ({"every": True}, "every", "an interval"),
        ({"every": None, "cron": "61 * * * *"}, "cron", "is not a cron expression"),
        ({"every": None, "cron": "* * *"}, "cron", "is not a cron expression"),
        ({"timezone": "Europe/Riga"}, "timezone", "only a cron expression"),
        ({"every": None, "cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "timezone", "unknown"),
        ({"request": {"source": "INTERNAL"}}, "request.endpoint_id", "Field required"),
        ({"request": {**INDEX, "source": "LATER"}}, "request.source", "Input should be"),
        ({"request": {**INDEX, "run_at": "2030-01-01T00:00:00Z"}}, "request.run_at", "at its tick"),
        ({"request": epq.RegisterJobRequest(endpoint_id=ENDPOINT, job_id="j", job_metadata={})},
         "request", "index_endpoint takes a EnqueueIndexEndpointRequest"),
        ({"kind": "app_task", "request": {"at": object()}}, "request", "not JSON"),
        ({"kind": "app_task", "request": 42}, "request", "a mapping, a request model or a function"),
    ],
)  # fmt: skip
def test_a_declaration_that_cannot_work_is_refused_naming_the_field(
    kwargs: dict[str, Any], field: str, text: str
) -> None:
    given = {"name": "job", "kind": "index_endpoint", "every": 60, "request": INDEX, **kwargs}
    with pytest.raises(epq.ConfigurationError) as caught:
        epq.periodic(given.pop("name"), given.pop("kind"), **given)
    assert f"periodic job '{kwargs.get('name', 'job')}': {field}: " in str(caught.value)
    assert text in str(caught.value)
    assert declared() == []


def test_an_actor_of_the_applications_is_named_by_its_actor_and_takes_its_keyword_arguments() -> None:
    purge = dramatiq.Actor(
        lambda days: None, broker=StubBroker(), actor_name="purge_old_indexings", queue_name="maintenance",
        priority=0, options={},
    )  # fmt: skip
    job = define("purge", purge, cron="@hourly", request={"days": 30})
    assert job.kind == "purge_old_indexings"
    assert job.cron == "0 * * * *"
    assert job.request == {"days": 30}
    assert job.timing == "cron 0 * * * * (UTC)"
    assert define("purge", "purge_old_indexings", cron="0 * * * *", request={"days": 30}) == job


def test_a_request_function_makes_each_ticks_request_from_the_ticks_time() -> None:
    seen: list[datetime] = []

    def request(tick: datetime) -> dict[str, Any]:
        seen.append(tick)
        return {**INDEX, "reason": f"tick {tick:%H:%M}"}

    job = epq.periodic("reindex", "index_endpoint", every=60, request=request)
    assert job.request_for(ms("2024-05-01 10:30:00")) == {**INDEX, "reason": "tick 10:30"}
    assert seen == [datetime(2024, 5, 1, 10, 30, tzinfo=timezone.utc)]
    assert job.request_text.endswith("request()")


# ---- EPQ_PERIODIC ------------------------------------------------------------------------------


def test_the_settings_declare_periodic_jobs_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    value = {
        "reindex": {"kind": "index_endpoint", "every": "PT30M", "request": INDEX},
        "purge": {"kind": "purge_old_indexings", "cron": "0 * * * *", "timezone": "Europe/Riga"},
    }
    monkeypatch.setenv("EPQ_PERIODIC", json.dumps(value))
    jobs = get_settings().periodic_jobs
    assert sorted(jobs) == ["purge", "reindex"]
    assert jobs["reindex"].every_ms == 30 * MIN
    assert jobs["reindex"].request == epq.EnqueueIndexEndpointRequest(**INDEX)
    assert (jobs["purge"].cron, jobs["purge"].timezone) == ("0 * * * *", "Europe/Riga")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("{not json", "not JSON"),
        ('["reindex"]', "a JSON object of schedules"),
        ('{"reindex": 5}', "reindex: an object with kind"),
        ('{"reindex": {"every": 60}}', "reindex.kind: required"),
        ('{"reindex": {"kind": "index_endpoint", "every": 60, "evry": 1}}', "reindex.evry: not a field"),
        ('{"reindex": {"kind": "index_endpoint", "every": 0}}', "reindex.every: at least 1 second"),
        ('{"reindex": {"kind": "index_endpoint", "cron": "* *"}}', "reindex.cron: '* *' is not a cron"),
        ('{"reindex": {"kind": "index_endpoint", "every": 60, "request": {"source": "API"}}}',
         "reindex.request.endpoint_id: Field required"),
    ],
)  # fmt: skip
def test_bad_periodic_settings_name_the_variable_the_job_and_the_field(
    monkeypatch: pytest.MonkeyPatch, value: str, text: str
) -> None:
    monkeypatch.setenv("EPQ_PERIODIC", value)
    with pytest.raises(epq.ConfigurationError) as caught:
        get_settings()
    assert "EPQ_PERIODIC: " in str(caught.value)
    assert text in str(caught.value)


def test_no_periodic_settings_is_no_periodic_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_settings().periodic_jobs == {}
    monkeypatch.setenv("EPQ_PERIODIC", " ")
    reset_settings()
    assert get_settings().periodic_jobs == {}


# ---- when ticks fall ---------------------------------------------------------------------------


def every(seconds: float) -> PeriodicJob:
    return define("job", "index_endpoint", every=seconds, request=INDEX)


def cron(expression: str, tz: str | None = None) -> PeriodicJob:
    return define("job", "index_endpoint", cron=expression, timezone=tz, request=INDEX)


def test_an_interval_ticks_at_its_multiples_since_the_epoch() -> None:
    job = every(30 * 60)
    assert job.next_after(ms("2024-05-01 10:14:59")) == ms("2024-05-01 10:30:00")
    assert job.next_after(ms("2024-05-01 10:30:00")) == ms("2024-05-01 11:00:00")  # after: not at
    assert job.latest_at_or_before(ms("2024-05-01 10:30:00")) == ms("2024-05-01 10:30:00")
    assert job.latest_at_or_before(ms("2024-05-01 10:29:59") + 999) == ms("2024-05-01 10:00:00")
    assert list(job.ticks_between(ms("2024-05-01 10:00:00"), ms("2024-05-01 11:30:00"))) == [
        ms("2024-05-01 10:30:00"), ms("2024-05-01 11:00:00"), ms("2024-05-01 11:30:00"),
    ]  # fmt: skip


def test_a_cron_expression_ticks_in_utc_at_second_precision() -> None:
    job = cron("*/30 * * * *")
    at = ms("2024-05-01 10:30:00")
    assert job.next_after(at - 1) == at
    assert job.next_after(at) == ms("2024-05-01 11:00:00")
    assert job.next_after(at + 500) == ms("2024-05-01 11:00:00")
    assert job.latest_at_or_before(at) == at
    assert job.latest_at_or_before(at + 500) == at
    assert job.latest_at_or_before(at - 1) == ms("2024-05-01 10:00:00")
    hourly = cron("@hourly")
    assert list(hourly.ticks_between(ms("2024-05-01 22:00:00"), ms("2024-05-02 01:00:00"))) == [
        ms("2024-05-01 23:00:00"), ms("2024-05-02 00:00:00"), ms("2024-05-02 01:00:00"),
    ]  # fmt: skip


def test_a_cron_expression_may_have_a_seconds_field_first() -> None:
    job = cron("*/5 * * * * *")
    assert job.next_after(ms("2024-05-01 10:30:01")) == ms("2024-05-01 10:30:05")


def test_a_cron_expression_in_a_time_zone_keeps_local_time_across_daylight_saving() -> None:
    # 03:30 every day in Riga: UTC+2 in winter, UTC+3 from 31 March 2024 (03:00 -> 04:00)
    job = cron("30 3 * * *", "Europe/Riga")
    assert job.next_after(ms("2024-03-29 12:00:00", "Europe/Riga")) == ms(
        "2024-03-30 03:30:00", "Europe/Riga"
    )
    assert ms("2024-03-30 03:30:00", "Europe/Riga") == ms("2024-03-30 01:30:00")
    # on the day the clocks go forward, 03:30 does not exist: Debian cron runs it at once (04:00)
    assert job.next_after(ms("2024-03-30 12:00:00", "Europe/Riga")) == ms("2024-03-31 01:00:00")
    assert job.next_after(ms("2024-04-01 00:00:00", "Europe/Riga")) == ms("2024-04-01 00:30:00")


def test_timing_texts() -> None:
    assert every(90).timing == "every 1m30s"
    assert every(86400).timing == "every 1d"
    assert every(1.5).timing == "every 1.5s"
    assert cron("0 3 * * *", "Europe/Riga").timing == "cron 0 3 * * * (Europe/Riga)"


def test_a_ticks_lock_holds_ten_minutes_or_two_periods() -> None:
    assert every(1).lock_ms(0) == TICK_LOCK_MIN_MS
    assert every(3600).lock_ms(0) == 2 * HOUR
    assert cron("0 0 1 * *").lock_ms(ms("2024-02-01 00:00:00")) == 2 * 29 * 24 * HOUR  # (February 2024)


# ---- which ticks are due -----------------------------------------------------------------------


def test_no_tick_is_due_before_the_next_one() -> None:
    job = every(60)
    assert due_ticks(job, ms("2024-05-01 10:00:00"), ms("2024-05-01 10:00:59")) == []
    assert due_ticks(job, ms("2024-05-01 10:00:30"), ms("2024-05-01 10:00:59")) == []


def test_the_tick_that_came_is_due() -> None:
    job = every(60)
    assert due_ticks(job, ms("2024-05-01 10:00:00"), ms("2024-05-01 10:01:00")) == [ms("2024-05-01 10:01:00")]


def test_ticks_missed_by_less_than_a_minute_are_all_due_in_order() -> None:
    job = every(10)
    cursor = ms("2024-05-01 10:00:00")
    assert due_ticks(job, cursor, cursor + 45 * S) == [cursor + n * 10 * S for n in (1, 2, 3, 4)]


def test_of_ticks_missed_longer_ago_only_the_last_minutes_are_due() -> None:
    job = every(10)
    cursor = ms("2024-05-01 10:00:00")
    now = cursor + HOUR + 5 * S
    assert due_ticks(job, cursor, now) == [now - 5 * S - n * 10 * S for n in (5, 4, 3, 2, 1, 0)]
    assert CATCH_UP_MS == MIN


def test_of_ticks_all_missed_long_ago_the_latest_alone_is_due() -> None:
    job = every(30 * 60)
    cursor = ms("2024-05-01 10:00:00")
    assert due_ticks(job, cursor, ms("2024-05-01 13:10:00")) == [ms("2024-05-01 13:00:00")]
