"""Redis memory per job: epq against plain Dramatiq, for the same payload.

    python benchmarks/memory.py --redis redis://127.0.0.1:6420          # about 20 s

For each side, ``--n`` register_job-shaped jobs (an endpoint id, a job id and a small metadata
object) are sent one by one on a Redis database of their own, and Redis's ``used_memory`` is read
before and after:

- per waiting job: what the jobs add while they wait (plain Dramatiq: the message; epq: the
  message, the record, the uniqueness lock and the counters);
- per completed job: what is left once an in-process worker has run them all (plain Dramatiq
  keeps nothing; epq keeps each record for ``EPQ_COMPLETED_RETENTION``, and the lock until its
  window ends).

With ``--sizing``, three more rows for sizing a Redis (``docs/scaling.md``), each from jobs of
its own:

- per lock left after its record: completed jobs with ``EPQ_COMPLETED_MAX=0`` (no record kept, the
  lock held until its window ends; plain Dramatiq keeps nothing);
- per dead job: jobs whose handler raises on their one attempt (epq: the record with its error
  and traceback, the dead-lettered message; plain Dramatiq: the dead-lettered message);
- per job scheduled an hour ahead (epq: the schedule entry, the record and the lock; plain
  Dramatiq: its delay queue).

Uses databases 11 (plain Dramatiq) and 12 (epq) of ``--redis``, flushed before and after: run
it against a server of its own (``brokers/redis-start``). Prints a table with the epq/plain
ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import epq  # noqa: E402
import epq.testing  # noqa: E402
from epq import handlers  # noqa: E402

PLAIN_DB, EPQ_DB = 11, 12


def _payload(n: int) -> dict[str, Any]:
    return {
        "endpoint_id": str(uuid.UUID(int=n + 1)),
        "job_id": f"send-welcome-email-{n}",
        "job_metadata": {"version": "1.0.0", "trigger": "signup"},
    }


def _db_url(base: str, db: int) -> str:
    return urlsplit(base)._replace(path=f"/{db}").geturl()


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _settle(client: redis.Redis) -> int:
    time.sleep(0.2)  # (lazy frees and the allocator's statistics)
    return _used(client)


def _wait(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not finish in time")
        time.sleep(0.05)


def measure_plain(url: str, n: int) -> tuple[float, float]:
    """Bytes per waiting and per completed job for plain Dramatiq."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    broker = RedisBroker(url=url)
    done: list[int] = []

    @dramatiq.actor(broker=broker, actor_name="register_job", max_retries=0)
    def register_job(endpoint_id: str, job_id: str, job_metadata: dict[str, Any]) -> None:
        done.append(1)

    before = _settle(client)
    for i in range(n):
        register_job.send(**_payload(i))
    waiting = _settle(client) - before
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=100)
    worker.start()
    _wait(lambda: len(done) >= n, 120)
    worker.join()
    worker.stop()
    completed = _settle(client) - before
    broker.close()
    client.flushdb()
    client.close()
    return waiting / n, completed / n


def measure_epq(url: str, n: int) -> tuple[float, float]:
    """Bytes per waiting and per completed job for epq (register_job, uniqueness on)."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    broker = epq.testing.install(url)
    from epq import actors  # (bound to the broker just built)

    handlers.register("register_job", lambda request: None, replace=True)
    before = _settle(client)
    for i in range(n):
        actors.register_job.send(**_payload(i))
    waiting = _settle(client) - before
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=100)
    worker.start()
    service = epq.QueueService(broker)

    def all_completed() -> bool:
        rows = service.stats()
        return not any(row["waiting"] or row["running"] for row in rows)

    _wait(all_completed, 120)
    worker.join()
    worker.stop()
    completed = _settle(client) - before
    epq.testing.reset()
    client.flushdb()
    client.close()
    return waiting / n, completed / n


def _plain_sizing(url: str, n: int) -> dict[str, float]:
    """Plain Dramatiq's bytes per dead job and per job delayed an hour."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    broker = RedisBroker(url=url)
    ran: list[int] = []

    @dramatiq.actor(broker=broker, actor_name="register_job", max_retries=0)
    def register_job(endpoint_id: str, job_id: str, job_metadata: dict[str, Any]) -> None:
        ran.append(1)
        raise RuntimeError(f"the endpoint answered 503 for {job_id}")

    out: dict[str, float] = {"lock": 0.0}
    before = _settle(client)
    for i in range(n):
        register_job.send(**_payload(i))
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=100)
    worker.start()
    _wait(lambda: len(ran) >= n and client.zcard("dramatiq:default.XQ") >= n, 120)
    worker.stop()
    out["dead"] = (_settle(client) - before) / n
    client.flushdb()
    before = _settle(client)
    for i in range(n):
        register_job.send_with_options(kwargs=_payload(i), delay=3_600_000)
    out["scheduled"] = (_settle(client) - before) / n
    broker.close()
    client.flushdb()
    client.close()
    return out


def _epq_sizing(url: str, n: int) -> dict[str, float]:
    """epq's bytes per lock left after its record, per dead job and per job scheduled an hour
    ahead."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    broker = epq.testing.install(url)
    from epq import actors  # (bound to the broker just built)

    service = epq.QueueService(broker)
    records = epq.testing.backend(broker).records
    out: dict[str, float] = {}

    def drained() -> bool:
        return not any(row["waiting"] or row["running"] for row in service.stats())

    def run(handler: Any, send: Any) -> float:
        handlers.register("register_job", handler, replace=True)
        before = _settle(client)
        for i in range(n):
            send(i)
        worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=100)
        worker.start()
        _wait(drained, 120)
        worker.stop()
        return (_settle(client) - before) / n

    def fails(request: Any) -> None:
        raise RuntimeError(f"the endpoint answered 503 for {request.job_id}")

    records.completed_max = 0  # type: ignore[attr-defined]  # (each store has the setting)
    out["lock"] = run(lambda request: None, lambda i: actors.register_job.send(**_payload(i)))
    client.flushdb()

    def send_once(i: int) -> None:
        actors.register_job.send_with_options(kwargs=_payload(i), max_attempts=1)

    out["dead"] = run(fails, send_once)
    client.flushdb()
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    before = _settle(client)
    for i in range(n):
        actors.register_job.send(**_payload(i), run_at=later)
    out["scheduled"] = (_settle(client) - before) / n
    epq.testing.reset()
    client.flushdb()
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (databases 11, 12)")
    parser.add_argument("--n", type=int, default=20_000, help="jobs per side")
    parser.add_argument("--sizing", action="store_true", help="also per lock, per dead and per scheduled job")
    args = parser.parse_args()
    plain = measure_plain(_db_url(args.redis, PLAIN_DB), args.n)
    ours = measure_epq(_db_url(args.redis, EPQ_DB), args.n)
    print(f"{'Redis memory per job (bytes)':34} {'plain':>10} {'epq':>10} {'epq/plain':>10}")
    print("-" * 67)
    rows = [("waiting", plain[0], ours[0]), ("completed (history kept)", plain[1], ours[1])]
    if args.sizing:
        plain_more = _plain_sizing(_db_url(args.redis, PLAIN_DB), args.n)
        ours_more = _epq_sizing(_db_url(args.redis, EPQ_DB), args.n)
        for key, label in (("lock", "lock, its record forgotten"), ("dead", "dead (1 attempt)"),
                           ("scheduled", "scheduled an hour ahead")):  # fmt: skip
            rows.append((label, plain_more[key], ours_more[key]))
    for label, p, e in rows:
        ratio = f"{e / p:.2f}x" if p > 50 else "-"
        print(f"{label:34} {p:10.0f} {e:10.0f} {ratio:>10}")
    print(f"\n{args.n} register_job jobs a side; Redis used_memory before and after")


if __name__ == "__main__":
    main()
