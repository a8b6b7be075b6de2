"""The operator commands against a real Redis: stats, jobs show/cancel, dead list/retry/purge."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest
import redis

import epq
import epq.actors
from epq.backends.urls import mask_url
from epq.testing import HandlerRegistry, drain
from tests.conftest import REDIS_URL
from tests.e2e.test_cli import EPQ, run_epq
from tests.support.helpers import VALID, wait_for

pytestmark = pytest.mark.redis
ENV = {"EPQ_BROKER_URL": REDIS_URL}


@pytest.fixture
def jobs(redis_broker: dramatiq.Broker, epq_handlers: HandlerRegistry) -> dict[str, str]:
    """One job in each state: completed, discarded, scheduled, available (no worker left)."""

    def handler(request: Any) -> None:
        if request.job_id == "dies":
            raise ValueError("the endpoint answered 500")

    epq_handlers.register("register_job", handler)
    svc = epq.QueueService(redis_broker)
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        done = svc.enqueue_register_job({**VALID["register_job"], "job_id": "done"}).job.id
        time.sleep(0.002)  # (each job created in a millisecond of its own: listings order by it)
        dies = epq.actors.register_job.send_with_options(
            kwargs={**VALID["register_job"], "job_id": "dies"}, backoff_ms=[5]
        ).message_id
        assert wait_for(lambda: len(svc.list_dead()) == 1, timeout=10)
        drain(redis_broker, worker)
    finally:
        worker.stop()
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    scheduled = svc.enqueue_register_job({**VALID["register_job"], "job_id": "later", "run_at": later}).job.id
    time.sleep(0.002)
    waiting = svc.enqueue_register_job({**VALID["register_job"], "job_id": "waiting", "priority": 1}).job.id
    return {"done": done, "dies": dies, "scheduled": scheduled, "waiting": waiting}


def test_stats_table_and_json(jobs: dict[str, str]) -> None:
    out = run_epq("stats", env=ENV)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["queue", "priority", "waiting", "scheduled", "running", "dead"]
    assert lines[2].split() == ["default", "1", "1", "0", "0", "0"]
    assert lines[3].split() == ["default", "2", "0", "1", "0", "1"]

    data = json.loads(run_epq("stats", "--json", env=ENV).stdout)
    assert data == [
        {"queue": "default", "priority": 1, "waiting": 1, "scheduled": 0, "running": 0, "dead": 0},
        {"queue": "default", "priority": 2, "waiting": 0, "scheduled": 1, "running": 0, "dead": 1},
    ]


def test_stats_watch_refreshes() -> None:
    # The command gets SIGINT's default action, as under a terminal, even when this process was
    # started with SIGINT ignored (a background job of a non-interactive shell), which it would
    # inherit; a Python handler here is reset to the default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([EPQ, "stats", "--watch", "0.2", "--broker-url", REDIS_URL],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.stdout is not None
    seen = b""
    try:
        deadline = time.monotonic() + 30  # a loaded machine can take seconds to start Python
        while seen.count(b"epq stats") < 3 and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:  # it exited
                    break
                seen += chunk
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # not stopped by SIGINT: leave no process (or open pipe) behind
            proc.kill()
            proc.communicate()
    assert (seen + rest).count(b"epq stats") >= 3
    assert proc.returncode == 130


def test_jobs_show(jobs: dict[str, str]) -> None:
    out = run_epq("jobs", "show", jobs["dies"], env=ENV)
    assert out.returncode == 0, out.stderr
    assert "state      discarded" in out.stdout
    assert "attempt    3 of 3" in out.stdout
    assert out.stdout.count("ValueError: the endpoint answered 500") == 3

    record = json.loads(run_epq("jobs", "show", jobs["done"], "--json", env=ENV).stdout)
    assert (record["id"], record["state"], record["attempt"]) == (jobs["done"], "completed", 1)

    missing = run_epq("jobs", "show", "nope", env=ENV)
    assert missing.returncode == 1
    assert "no job 'nope'" in missing.stderr


def test_jobs_cancel(jobs: dict[str, str], redis_client: redis.Redis) -> None:
    out = run_epq("jobs", "cancel", jobs["waiting"], env=ENV)
    assert (out.returncode, out.stdout.strip()) == (0, f"{jobs['waiting']}: cancelled")
    assert redis_client.hget(f"epq:job:{jobs['waiting']}", "state") == b"cancelled"

    out = run_epq("jobs", "cancel", jobs["done"], "--json", env=ENV)
    assert out.returncode == 3
    assert json.loads(out.stdout)["cancelled"] is False
    assert run_epq("jobs", "cancel", jobs["done"], env=ENV).stdout.strip().endswith("the job is completed")


def test_dead_list_retry_purge(jobs: dict[str, str]) -> None:
    out = run_epq("dead", "list", env=ENV)
    assert out.returncode == 0, out.stderr
    header, _, row = out.stdout.splitlines()
    assert header.split()[:4] == ["id", "kind", "queue", "attempts"]
    assert row.startswith(jobs["dies"])
    assert "ValueError: the endpoint answered 500" in row

    listed = json.loads(run_epq("dead", "list", "--json", env=ENV).stdout)
    assert [r["id"] for r in listed] == [jobs["dies"]]

    out = run_epq("dead", "retry", jobs["dies"], env=ENV)
    assert out.returncode == 0, out.stderr
    assert f"{jobs['dies']}: available" in out.stdout
    listing = run_epq("dead", "list", env=ENV).stdout.splitlines()
    assert listing[0] == "no dead jobs"
    # (its first death's message is still in the dead-letter queue, which the listing says)
    assert listing[1].startswith("default.XQ holds 1 message(s), 1 without a record")

    assert run_epq("dead", "retry", env=ENV).returncode == 2  # an ID or --all
    assert json.loads(run_epq("dead", "purge", "--yes", "--json", env=ENV).stdout) == {"purged": 0}


def test_dead_list_limit_counts_jobs_and_never_drops_one(jobs: dict[str, str]) -> None:
    # (a negative limit used to reach Redis's ZREVRANGE as an index, dropping the oldest job)
    listed = json.loads(run_epq("dead", "list", "--limit", "1", "--json", env=ENV).stdout)
    assert [r["id"] for r in listed] == [jobs["dies"]]
    svc = epq.QueueService()
    assert svc.list_dead(0) == []
    with pytest.raises(ValueError, match="limit must be 0 or more, not -1"):
        svc.list_dead(-1)


def test_dead_retry_all(jobs: dict[str, str]) -> None:
    out = run_epq("dead", "retry", "--all", env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{jobs['dies']}: available", "retried 1 job(s)"]
    assert json.loads(run_epq("dead", "list", "--json", env=ENV).stdout) == []


def test_dead_purge_forgets_dead_jobs(jobs: dict[str, str]) -> None:
    out = run_epq("dead", "purge", "--yes", env=ENV)
    assert out.stdout.strip() == "purged 1 dead job(s)"
    assert run_epq("jobs", "show", jobs["dies"], env=ENV).returncode == 1


def test_dead_purge_without_a_terminal_or_yes_refuses(jobs: dict[str, str]) -> None:
    out = run_epq("dead", "purge", env=ENV)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.splitlines()[1:] == [
        "epq: error: dead purge would forget 1 dead job(s) and 1 message(s) in the dead-letter "
        "queues and asks first, but stdin is not a terminal: pass --yes to purge without asking"
    ]
    assert run_epq("jobs", "show", jobs["dies"], env=ENV).returncode == 0  # still there


def _purge_on_a_terminal(answer: str) -> tuple[int, str]:
    """Run ``epq dead purge`` with a pseudo-terminal as stdin, answer its question, return the
    exit code and everything it wrote to the terminal (stderr goes there too)."""
    primary, secondary = pty.openpty()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}, **ENV}
    proc = subprocess.Popen(
        [EPQ, "dead", "purge"], stdin=secondary, stdout=secondary, stderr=secondary, env=env
    )
    os.close(secondary)
    seen = b""
    try:
        while b"[y/N] " not in seen:
            ready, _, _ = select.select([primary], [], [], 30)
            assert ready, f"no question asked; got {seen!r}"
            seen += os.read(primary, 4096)
        os.write(primary, answer.encode() + b"\n")
        code = proc.wait(timeout=30)
        while select.select([primary], [], [], 0.2)[0]:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    return code, seen.decode().replace("\r\n", "\n")


def test_dead_purge_asks_on_a_terminal_and_no_keeps_the_jobs(jobs: dict[str, str]) -> None:
    code, text = _purge_on_a_terminal("n")
    question = "purge 1 dead job(s) and 1 message(s) in the dead-letter queues"
    assert f"{question} on {mask_url(REDIS_URL)}? [y/N] " in text
    assert "nothing purged" in text
    assert code == 1
    assert run_epq("jobs", "show", jobs["dies"], env=ENV).returncode == 0


def test_dead_purge_asks_on_a_terminal_and_yes_purges(jobs: dict[str, str]) -> None:
    code, text = _purge_on_a_terminal("y")
    assert code == 0
    assert "purged 1 dead job(s)" in text
    assert run_epq("jobs", "show", jobs["dies"], env=ENV).returncode == 1


def test_operator_commands_say_which_broker_on_stderr(jobs: dict[str, str]) -> None:
    for command in (
        ["stats", "--json"],
        ["dead", "list", "--json"],
        ["jobs", "show", jobs["done"], "--json"],
    ):
        out = run_epq(*command, env=ENV)
        assert out.returncode == 0, out.stderr
        assert out.stderr == f"epq: broker {mask_url(REDIS_URL)}\n"
        json.loads(out.stdout)  # stdout stays pure JSON


def test_jobs_show_and_cancel_take_a_unique_id_prefix(
    jobs: dict[str, str], redis_client: redis.Redis
) -> None:
    # the 8 characters `epq demo` prints are enough
    out = run_epq("jobs", "show", jobs["dies"][:8], "--json", env=ENV)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == jobs["dies"]
    out = run_epq("jobs", "cancel", jobs["waiting"][:13], env=ENV)
    assert (out.returncode, out.stdout.strip()) == (0, f"{jobs['waiting']}: cancelled")
    assert redis_client.hget(f"epq:job:{jobs['waiting']}", "state") == b"cancelled"
    out = run_epq("dead", "retry", jobs["dies"][:8], env=ENV)
    assert (out.returncode, out.stdout.splitlines()[0]) == (0, f"{jobs['dies']}: available")


def test_an_ambiguous_id_prefix_lists_the_matches(jobs: dict[str, str], redis_client: redis.Redis) -> None:
    twins = ["deadbeef-0000-4000-8000-000000000001", "deadbeef-0000-4000-8000-000000000002"]
    for job_id in twins:
        redis_client.hset(f"epq:job:{job_id}", "state", "available")
    out = run_epq("jobs", "show", "deadbeef", env=ENV)
    assert out.returncode == 1
    assert out.stderr.splitlines()[1:] == [
        f"epq: error: job id prefix 'deadbeef' matches 2 jobs: {twins[0]}, {twins[1]}; give more characters"
    ]
    assert "matches 2 jobs" in run_epq("jobs", "show", twins[0][:-1], env=ENV).stderr


@pytest.mark.parametrize("given", ["deadbeef*", "deadbe??", "*", "deadbe", "[d]eadbeef"])
def test_short_or_glob_prefixes_find_nothing(
    jobs: dict[str, str], redis_client: redis.Redis, given: str
) -> None:
    redis_client.hset("epq:job:deadbeef-0000-4000-8000-000000000001", "state", "available")
    out = run_epq("jobs", "show", given, env=ENV)
    assert out.returncode == 1
    assert out.stderr.splitlines()[1:] == [
        f"epq: error: no job {given!r} (never enqueued, or its record expired)"
    ]


@pytest.mark.parametrize("command", [["jobs", "show"], ["jobs", "cancel"], ["dead", "retry"]])
def test_a_job_id_that_is_not_text_is_not_found(command: list[str]) -> None:
    # a stray byte on the command line becomes a lone surrogate, which no Redis key can hold
    out = subprocess.run(
        [EPQ.encode(), *(c.encode() for c in command), b"0123abcd\xff"],
        env={**os.environ, **ENV}, capture_output=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    lines = out.stderr.decode().splitlines()
    assert lines[-1] == "epq: error: no job '0123abcd\\udcff' (never enqueued, or its record expired)"
    assert len(lines) == 2  # with the broker line


def test_dead_list_names_dead_letters_that_no_record_lists(
    redis_broker: dramatiq.Broker, jobs: dict[str, str]
) -> None:
    # Given, besides the one dead job, a message dead-lettered without a record
    client = redis_broker.client  # type: ignore[attr-defined]
    client.zadd("dramatiq:default.XQ", {"foreign": time.time() * 1000})
    # When an operator lists the dead jobs
    out = run_epq("dead", "list", env=ENV)
    # Then the listing says the dead-letter queue holds one more than it shows
    assert out.returncode == 0, out.stderr
    assert "default.XQ holds 2 message(s), 1 without a record" in out.stdout
