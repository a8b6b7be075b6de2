"""``epq periodic`` against a real Redis: the jobs of the settings and of the handler modules,
their next and last run, the state of the last run's job, a job that cannot run; and
``epq worker`` warning of one."""

from __future__ import annotations

import json
import os
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis

from epq import cli
from epq.backends.urls import mask_url
from epq.cli import worker
from epq.periodic_jobs import Ticks, define
from epq.testing import backend, install
from tests.conftest import REDIS_URL
from tests.e2e.test_cli import run_epq
from tests.support.helpers import VALID

pytestmark = pytest.mark.redis

HANDLERS = """
    import dramatiq
    import epq

    @dramatiq.actor(queue_name="maintenance")
    def purge_old_indexings(days=30):
        pass

    epq.periodic("purge-old-indexings", purge_old_indexings, cron="0 * * * *", request={"days": 7})
"""
REINDEX = {
    "kind": "index_endpoint",
    "every": 1800,
    "request": {**VALID["index_endpoint"], "source": "HOOK"},
}


@pytest.fixture
def env(tmp_path: Path, redis_client: redis.Redis) -> dict[str, str]:
    (tmp_path / "myapp_periodic.py").write_text(textwrap.dedent(HANDLERS))
    return {
        "EPQ_BROKER_URL": REDIS_URL,
        "EPQ_HANDLERS": "myapp_periodic",
        "EPQ_PERIODIC": json.dumps({"reindex": REINDEX, "ghost": {"kind": "no_such_actor", "every": 60}}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    }


def listing(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = run_epq("periodic", "--json", env=env)
    assert out.returncode == 0, out.stderr
    return {row["name"]: row for row in json.loads(out.stdout)}


def test_periodic_lists_the_jobs_of_the_settings_and_the_handler_modules(env: dict[str, str]) -> None:
    out = run_epq("periodic", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"epq: broker {mask_url(REDIS_URL)}\n"
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "name",
        "kind",
        "when",
        "next",
        "run",
        "(UTC)",
        "last",
        "run",
        "(UTC)",
        "last",
        "job",
        "state",
    ]
    rows = {line.split()[0]: line for line in lines[2:] if not line.startswith("ghost:")}
    assert sorted(rows) == ["ghost", "purge-old-indexings", "reindex"]
    assert "purge_old_indexings  cron 0 * * * * (UTC)" in rows["purge-old-indexings"]
    assert "index_endpoint" in rows["reindex"]
    assert "every 30m" in rows["reindex"]
    assert lines[-1] == (
        "ghost: not run: kind: no actor 'no_such_actor' on the broker (an epq kind, or an actor a handler "
        "module declares)"
    )
    rows_json = listing(env)
    assert rows_json["reindex"]["request"]["source"] == "HOOK"
    assert rows_json["purge-old-indexings"]["request"] == {"days": 7}
    assert rows_json["reindex"]["last_run"] is None
    assert rows_json["reindex"]["next_run"].endswith(("00:00+00:00", "30:00+00:00"))


def test_periodic_shows_the_last_run_its_jobs_state_and_a_tick_due(env: dict[str, str]) -> None:
    # Given a tick of reindex enqueued (as a worker's ticker would) and not run yet
    broker = install(REDIS_URL)
    store = backend(broker).state
    job = define("reindex", **REINDEX)
    tick = job.latest_at_or_before(store.now_ms())
    assert tick is not None
    store.periodic_begin("reindex", tick - 1, 3_600_000)
    (ran,) = Ticks().run(broker, store, [job])[0]
    # and a new schedule (purge) whose first hour went by with no worker running
    hour = define("purge-old-indexings", "purge_old_indexings", cron="0 * * * *").latest_at_or_before(tick)
    assert hour is not None
    store.periodic_begin("purge-old-indexings", hour - 1, 3_600_000)
    # When an operator lists the periodic jobs
    rows = listing(env)
    # Then reindex ran at its tick, its job waiting, and purge's tick is due
    assert rows["reindex"]["last_run"] == _iso(tick)
    assert (rows["reindex"]["last_job_id"], rows["reindex"]["last_job_state"]) == (ran.job_id, "available")
    assert rows["reindex"]["due"] is False
    assert rows["reindex"]["next_run"] == _iso(tick + 1_800_000)
    assert (rows["purge-old-indexings"]["due"], rows["purge-old-indexings"]["next_run"]) == (True, _iso(hour))
    assert "(due)" in run_epq("periodic", env=env).stdout


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat()


def test_the_worker_warns_of_a_periodic_job_whose_kind_is_no_actor(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(env["PYTHONPATH"].split(os.pathsep)[0])
    args, _ = cli._parser().parse_known_args(["worker"])
    assert worker.check_worker(args) == f"epq: broker {mask_url(REDIS_URL)}"
    assert capsys.readouterr().err == (
        "epq: warning: periodic job 'ghost' will not run: kind: no actor 'no_such_actor' on the broker "
        "(an epq kind, or an actor a handler module declares)\n"
    )
