"""The public surface: nothing leaks, nothing vanishes by accident."""

from __future__ import annotations

import subprocess
import sys

import dramatiq

import epq

EXPECTED = {
    "AttemptError", "BrokerUnavailable", "ConfigurationError", "DuplicateJob", "EndpointIndexSource",
    "EnqueueIndexEndpointRequest", "EpqError", "EpqSettings", "HandlerAlreadyRegistered", "HandlerError",
    "HandlerNotFound", "InvalidPayload", "InvalidRequest", "JobInsertResult", "JobNotFound", "JobPriority",
    "JobQueue",
    "JobRecord", "JobState", "QueueService", "RegisterDynamicScheduleRequest",
    "RegisterDynamicTriggerRequest", "RegisterJobRequest", "RegisterSourceRequest", "StateUnavailable",
    "__version__",
    "handler", "setup",
}  # fmt: skip


def test_all_is_pinned() -> None:
    assert set(epq.__all__) == EXPECTED
    for name in epq.__all__:
        assert hasattr(epq, name), name


def test_constants_match_the_go_package() -> None:
    assert [(p.name, p.value) for p in epq.JobPriority] == [
        ("HIGH", 1), ("NORMAL", 2), ("LOW", 3), ("VERY_LOW", 4)
    ]  # fmt: skip
    assert [q.value for q in epq.JobQueue] == ["default", "execution", "events", "maintenance"]
    assert [s.value for s in epq.EndpointIndexSource] == ["MANUAL", "API", "INTERNAL", "HOOK"]
    assert [s.value for s in epq.JobState] == [
        "available", "scheduled", "running", "retryable", "completed", "discarded", "cancelled"
    ]  # fmt: skip


def test_error_tree() -> None:
    assert issubclass(epq.InvalidRequest, epq.EpqError)
    assert issubclass(epq.InvalidRequest, ValueError)
    assert issubclass(epq.DuplicateJob, dramatiq.middleware.MiddlewareError)
    assert issubclass(epq.DuplicateJob, epq.EpqError)
    for name in ("ConfigurationError", "BrokerUnavailable", "HandlerNotFound", "InvalidPayload"):
        assert issubclass(getattr(epq, name), epq.EpqError)


def test_importing_epq_connects_to_nothing() -> None:
    # No broker is built and no server started by `import epq`, whatever the environment says.
    code = (
        "import epq, dramatiq.broker as b, epq._runtime as r; "
        "assert r.current() is None; assert b.global_broker is None; print('ok')"
    )
    env = {"EPQ_BROKER_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
