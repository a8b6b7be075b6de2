"""``epq outbox migrate|status`` and ``epq relay``: what they print, do, and say when something is
missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import dramatiq
import psycopg
import pytest

import epq
from epq.outbox import schema_sql
from epq.settings import reset_settings
from epq.testing import install
from tests.conftest import REDIS_URL, postgres_available
from tests.support.helpers import index_request, wait_for
from tests.support.postgres import POSTGRES_URL, rows

pytestmark = pytest.mark.postgres

EPQ = str(Path(sys.executable).parent / "epq")


def run_epq(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
    return subprocess.run([EPQ, *args], env={**base, **env}, capture_output=True, text=True, timeout=timeout)


def test_migrate_print_shows_the_sql_it_runs() -> None:
    out = run_epq("outbox", "migrate", "--print", env={})
    assert (out.returncode, out.stdout, out.stderr) == (0, schema_sql("epq_outbox"), "")
    out = run_epq("outbox", "migrate", "--print", env={"EPQ_OUTBOX_TABLE": "app.jobs_outbox"})
    assert out.stdout == schema_sql("app.jobs_outbox")
    assert out.stdout.startswith("CREATE SCHEMA IF NOT EXISTS app;")


def test_migrate_creates_the_table_again_safely_and_status_counts_what_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = postgres_available()
    table = f"{schema.name}.outbox_cli_{uuid.uuid4().hex[:8]}"
    env = {"EPQ_OUTBOX_URL": POSTGRES_URL, "EPQ_OUTBOX_TABLE": table}
    schema.created = True  # (migrate makes the schema: dropped at the end with the others)
    try:
        for _ in range(2):  # (a second run changes nothing)
            out = run_epq("outbox", "migrate", env=env)
            assert out.returncode == 0, out.stderr
            assert out.stdout == f"epq: the outbox table {table} is ready in {POSTGRES_URL}\n"
        out = run_epq("outbox", "status", "--json", env=env)
        assert json.loads(out.stdout) == {"table": table, "pending": 0, "oldest_pending_seconds": None}
        # two jobs committed, not relayed
        monkeypatch.setenv("EPQ_OUTBOX_TABLE", table)
        reset_settings()
        broker = install("stub://")
        with psycopg.connect(POSTGRES_URL) as connection:
            epq.QueueService(broker).enqueue_many([index_request(1), index_request(2)], tx=connection)
            connection.commit()
        status = json.loads(run_epq("outbox", "status", "--json", env=env).stdout)
        assert status["pending"] == 2
        assert 0 <= status["oldest_pending_seconds"] < 60
        assert run_epq("outbox", "status", env=env).stdout.startswith(
            f"{table}: 2 job(s) pending, the oldest"
        )
    finally:
        schema.drop_table(table)


def test_the_commands_say_what_is_missing(tmp_path: Path) -> None:
    out = run_epq("relay", env={"EPQ_BROKER_URL": "stub://"})
    assert out.returncode == 2
    assert "set EPQ_OUTBOX_URL (or --outbox-url)" in out.stderr
    out = run_epq("outbox", "status", env={"EPQ_OUTBOX_URL": "postgresql://postgres@127.0.0.1:1/test"})
    assert out.returncode == 1
    assert out.stderr.startswith("epq: error: cannot reach the outbox database (EPQ_OUTBOX_URL)")
    assert len(out.stderr.splitlines()) == 1
    missing = f"{postgres_available().name}.missing_outbox"
    env = {"EPQ_BROKER_URL": "stub://", "EPQ_OUTBOX_URL": POSTGRES_URL, "EPQ_OUTBOX_TABLE": missing}
    out = run_epq("relay", env=env)
    assert out.returncode == 1
    assert f"the outbox table {missing} does not exist" in out.stderr
    assert "epq outbox migrate" in out.stderr
    assert run_epq("relay", "--batch", "0", env=env).returncode == 2


@pytest.mark.redis
def test_relay_moves_committed_jobs_and_stops_on_sigterm(outbox: str, redis_broker: dramatiq.Broker) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}, "EPQ_BROKER_URL": REDIS_URL}
    env |= {"EPQ_OUTBOX_URL": POSTGRES_URL, "EPQ_OUTBOX_TABLE": outbox}
    relay = subprocess.Popen(
        [EPQ, "relay"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with psycopg.connect(POSTGRES_URL) as connection:
            result = epq.QueueService(redis_broker).enqueue_index_endpoint(index_request(1), tx=connection)
            connection.commit()
        assert wait_for(lambda: rows(POSTGRES_URL, outbox) == [], timeout=30)
        record = epq.QueueService(redis_broker).get_job(result.job.id)
        assert record is not None
        assert record.state is epq.JobState.AVAILABLE
    finally:
        relay.send_signal(signal.SIGTERM)
        _, stderr = relay.communicate(timeout=30)
    assert relay.returncode == 0, stderr
    assert f"epq: relaying {outbox} from {POSTGRES_URL} to " in stderr


def test_the_readmes_outbox_example_runs_as_written(outbox: str, epq_broker: dramatiq.Broker) -> None:
    # Given the README's example, on the test database (its URL and an endpoints table of its own)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Transactional enqueue (outbox)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    endpoints = f"{postgres_available().name}.readme_endpoints"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(
            f"CREATE TABLE IF NOT EXISTS {endpoints} (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), "
            "url text)"
        )
    code = code.replace('"postgresql://app@db/app"', repr(POSTGRES_URL)).replace(
        "INTO endpoints ", f"INTO {endpoints} "
    )
    # When it runs, then the endpoint and its pending job are committed together
    namespace: dict[str, object] = {"url": "https://example.com/api"}
    exec(code, namespace)
    result = namespace["result"]
    assert isinstance(result, epq.JobInsertResult)
    assert result.job.state is epq.JobState.PENDING
    assert [row[0] for row in rows(POSTGRES_URL, outbox)] == [result.job.id]
