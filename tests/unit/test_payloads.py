"""What a worker does with a payload before its handler (``epq.payloads``): payload upgrades in the
order declared, unknown fields dropped at every depth (named once per kind and dotted path) or
refused for a strict kind, then validation. Through the worker's own path, without a broker
(``epq.testing.worker_request``); ``tests/contract/test_rolling_deploy.py`` runs it on every
broker."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, JsonValue

import epq
from epq import handlers, payloads
from epq.kinds import get_kind
from epq.testing import HandlerRegistry, worker_request
from tests.support.helpers import VALID

TODAY = VALID["register_job"]


def unique_field() -> str:
    """A field name of the test's own (each kind and field is logged once per process)."""
    return f"f_{uuid.uuid4().hex[:8]}"


def warnings_naming(caplog: pytest.LogCaptureFixture, path: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and repr(path) in r.getMessage()
    ]


# ---- declaring upgrades ----------------------------------------------------------------------


def test_upgrades_run_in_the_order_declared_each_on_the_last_ones_result(
    epq_handlers: HandlerRegistry,
) -> None:
    # Given an old producer's payload: metadata under another name, the version beside it
    @epq.payload_upgrade("register_job")
    def metadata_was_meta(payload: dict[str, Any]) -> dict[str, Any]:
        if "meta" in payload:
            payload["job_metadata"] = payload.pop("meta")
        return payload

    @epq.payload_upgrade("register_job")
    def version_moved_into_metadata(payload: dict[str, Any]) -> dict[str, Any]:
        # (needs job_metadata: runs after the rename)
        if "version" in payload:
            payload["job_metadata"] = {**payload["job_metadata"], "version": payload.pop("version")}
        return payload

    old = {"endpoint_id": TODAY["endpoint_id"], "job_id": "j", "meta": {"a": 1}, "version": "2"}
    request = worker_request("register_job", old)
    assert isinstance(request, epq.RegisterJobRequest)
    assert request.job_metadata == {"a": 1, "version": "2"}
    # and a payload already in today's shape goes through them unchanged
    assert worker_request("register_job", TODAY) == epq.RegisterJobRequest(**TODAY)
    assert handlers.get_upgrades("register_job") == (metadata_was_meta, version_moved_into_metadata)
    assert handlers.get_upgrades("register_source") == ()


def test_the_same_upgrade_declared_twice_runs_once(epq_handlers: HandlerRegistry) -> None:
    calls: list[int] = []

    def count(payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return payload

    epq.payload_upgrade("register_job")(count)
    epq.payload_upgrade("register_job")(count)
    worker_request("register_job", TODAY)
    assert calls == [1]


def test_an_upgrade_for_an_unknown_kind_or_not_a_function_is_refused(epq_handlers: HandlerRegistry) -> None:
    with pytest.raises(KeyError, match="register_jobs"):
        epq.payload_upgrade("register_jobs")
    with pytest.raises(TypeError, match="register_job"):
        handlers.register_upgrade("register_job", {"job_metadata": "meta"})  # type: ignore[arg-type]


def test_upgrades_declared_in_a_test_are_forgotten_after_it() -> None:
    with handlers.isolated_handlers():
        epq.payload_upgrade("register_job")(lambda payload: payload)
        assert len(handlers.get_upgrades("register_job")) == 1
    assert handlers.get_upgrades("register_job") == ()


def test_an_upgrade_that_changes_its_payload_in_place_leaves_the_messages_payload_alone(
    epq_handlers: HandlerRegistry,
) -> None:
    @epq.payload_upgrade("register_job")
    def tag_metadata(payload: dict[str, Any]) -> dict[str, Any]:
        payload["job_metadata"]["upgraded"] = True
        return payload

    sent = {**TODAY, "job_metadata": {"version": "1"}}
    assert worker_request("register_job", sent).job_metadata == {"version": "1", "upgraded": True}  # type: ignore[attr-defined]
    assert sent["job_metadata"] == {"version": "1"}  # (a retried message carries it as it was sent)


# ---- upgrades that fail ------------------------------------------------------------------------


def test_an_upgrade_that_raises_names_the_kind_and_the_upgrade(epq_handlers: HandlerRegistry) -> None:
    @epq.payload_upgrade("register_job")
    def fine(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    @epq.payload_upgrade("register_job")
    def needs_meta(payload: dict[str, Any]) -> dict[str, Any]:
        payload["job_metadata"] = payload.pop("meta")
        return payload

    with pytest.raises(epq.PayloadUpgradeFailed) as caught:
        worker_request("register_job", TODAY)
    error = caught.value
    assert isinstance(error, epq.InvalidPayload)  # (so the worker dead-letters it, never retries)
    assert (error.kind, error.position, error.count) == ("register_job", 2, 2)
    assert error.upgrade.endswith(
        "test_an_upgrade_that_raises_names_the_kind_and_the_upgrade.<locals>.needs_meta"
    )
    assert str(error) == f"register_job payload upgrade {error.upgrade} (2 of 2) failed: KeyError: 'meta'"
    assert isinstance(error.__cause__, KeyError)


def test_an_upgrade_that_returns_no_dict_fails_likewise(epq_handlers: HandlerRegistry) -> None:
    @epq.payload_upgrade("register_job")  # type: ignore[type-var]
    def forgot_to_return(payload: dict[str, Any]) -> None:
        payload["job_id"] = "x"

    with pytest.raises(
        epq.PayloadUpgradeFailed, match=r"forgot_to_return \(1 of 1\) failed: it returned NoneType"
    ):
        worker_request("register_job", TODAY)


class Interrupted(BaseException):
    """Like Dramatiq's time limit or a cancellation: raised into the worker thread."""


def test_an_interrupt_during_an_upgrade_is_not_taken_for_its_failure(epq_handlers: HandlerRegistry) -> None:
    @epq.payload_upgrade("register_job")
    def interrupted(payload: dict[str, Any]) -> dict[str, Any]:
        raise Interrupted()

    with pytest.raises(Interrupted):
        worker_request("register_job", TODAY)


# ---- upgrades and unknown fields -----------------------------------------------------------------


def test_a_field_an_upgrade_consumed_is_not_named_unknown(
    epq_handlers: HandlerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    old_name = unique_field()

    @epq.payload_upgrade("register_job")
    def renamed(payload: dict[str, Any]) -> dict[str, Any]:
        if old_name in payload:
            payload["job_metadata"] = payload.pop(old_name)
        return payload

    caplog.set_level(logging.WARNING, logger="epq")
    old = {"endpoint_id": TODAY["endpoint_id"], "job_id": "j", old_name: {"a": 1}}
    assert worker_request("register_job", old).job_metadata == {"a": 1}  # type: ignore[attr-defined]
    assert warnings_naming(caplog, old_name) == []


def test_a_strict_kind_runs_its_upgrades_then_refuses_what_is_left_unknown(
    epq_handlers: HandlerRegistry,
) -> None:
    @epq.payload_upgrade("register_job")
    def metadata_was_meta(payload: dict[str, Any]) -> dict[str, Any]:
        if "meta" in payload:
            payload["job_metadata"] = payload.pop("meta")
        return payload

    old = {"endpoint_id": TODAY["endpoint_id"], "job_id": "j", "meta": {}}
    assert worker_request("register_job", old, strict=True).job_metadata == {}  # type: ignore[attr-defined]
    with pytest.raises(epq.InvalidPayload, match="retry_policy"):
        worker_request("register_job", {**old, "retry_policy": "fast"}, strict=True)


def test_keys_inside_free_form_metadata_are_data_not_unknown_fields(caplog: pytest.LogCaptureFixture) -> None:
    # The request models nest no model: their metadata is free-form JSON, kept whole.
    caplog.set_level(logging.WARNING, logger="epq")
    metadata = {"anything": {"deeper": [1, {"new": True}]}}
    assert worker_request("register_job", {**TODAY, "job_metadata": metadata}).job_metadata == metadata  # type: ignore[attr-defined]
    assert caplog.records == []


# ---- unknown fields inside nested models ---------------------------------------------------------


class Trigger(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class Loose(BaseModel):
    """A nested model that keeps unknown fields itself: nothing of it is dropped."""

    model_config = ConfigDict(extra="allow")

    inner: Trigger | None = None


class Nested(BaseModel):
    """A request model with models inside it, as a later one could have."""

    model_config = ConfigDict(extra="forbid")

    trigger: Trigger
    maybe: Trigger | None = None
    triggers: list[Trigger] = []
    by_name: dict[str, Trigger] = {}
    loose: Loose | None = None
    free: dict[str, JsonValue] = {}


def test_unknown_fields_inside_nested_models_are_dropped_and_named_once_by_dotted_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x = unique_field()
    caplog.set_level(logging.WARNING, logger="epq")
    payload = {
        "trigger": {"name": "t", x: 1},
        "maybe": {"name": "m", x: 2},
        "triggers": [{"name": "a", x: 3}, {"name": "b"}, {"name": "c", x: 4}],
        "by_name": {"k": {"name": "k", x: 5}},
        "loose": {"kept": 6, "inner": {"name": "i", x: 7}},
        "free": {x: 8},
        x: 9,
    }
    known = payloads.known_fields_only("register_trigger", Nested, payload)
    request = Nested.model_validate(known)
    assert request.trigger == Trigger(name="t")
    assert [t.name for t in request.triggers] == ["a", "b", "c"]
    assert request.loose is not None
    assert request.loose.model_extra == {"kept": 6}
    assert request.free == {x: 8}
    assert payload["trigger"] == {"name": "t", x: 1}  # (the payload itself is left as it was)
    for path in (x, f"trigger.{x}", f"maybe.{x}", f"triggers[].{x}", f"by_name.*.{x}", f"loose.inner.{x}"):
        named = warnings_naming(caplog, path)
        assert len(named) == 1, (path, named)
        assert "register_trigger payloads carry field" in named[0]
    # and again: nothing more is logged
    caplog.clear()
    payloads.known_fields_only("register_trigger", Nested, payload)
    assert caplog.records == []


def test_a_strict_kind_refuses_an_unknown_nested_field_naming_its_path() -> None:
    kind = replace(get_kind("register_job"), model=Nested)  # type: ignore[arg-type]
    payload = {"trigger": {"name": "t", "extra": 1}}
    with pytest.raises(epq.InvalidPayload, match=r"trigger\.extra"):
        payloads.to_request(kind, payload, strict=True)
    assert payloads.to_request(kind, payload).trigger == Trigger(name="t")  # type: ignore[attr-defined]
