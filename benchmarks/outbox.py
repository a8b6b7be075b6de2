"""Transactional enqueue (``tx=``): commit-to-start latency with an idle relay, and the enqueue
rate inside a transaction beside plain ``enqueue_*``, on Redis and on RabbitMQ + Redis state.

    python benchmarks/outbox.py --redis redis://127.0.0.1:7601 \\
        [--rabbitmq amqp://guest:guest@127.0.0.1:7602/%2F] \\
        [--postgres postgresql://postgres@127.0.0.1:5432/test] [--n 1000] [--rounds 5] \\
        [--latency-jobs 200]

Latency: one worker process (``dramatiq epq.actors``, 2 threads), idle. Transactions commit one
at a time, 20 to 60 ms apart, each enqueueing one ``register_job`` whose metadata carries the
time its enqueue began; the handler notes how long after that it started. So the figure is
enqueue-and-commit to *start*: it includes the enqueue's INSERT and the COMMIT (about a
millisecond each here), the relay's move (woken by NOTIFY), the promotion out of the schedule
and the worker's fetch, and bounds commit to *available* from above. Two set-ups:

- ``in worker``: the relay in the worker process (``EPQ_OUTBOX_URL`` set for the worker: the
  default deployment);
- ``epq relay``: the relay on its own (``epq relay``) and a worker without one
  (``EPQ_OUTBOX_RELAY=0``); on RabbitMQ the worker's promoter then finds the jobs on its next
  look (every 100 ms) rather than being woken.

Rates: ``--n`` jobs a round, ``--rounds`` alternating rounds, median round of each, in this
process on a psycopg connection (the outbox not relayed meanwhile; emptied between rounds):

- ``enqueue_*``: plain ``QueueService.enqueue_register_job(request)``;
- ``tx=conn``: each job in a transaction of its own (``with conn.transaction():``);
- ``app write``: the application's own transaction without epq (one INSERT), the baseline of
- ``app write + tx=conn``: the same transaction that also enqueues ("create the endpoint, then
  index it");
- ``tx=session``: as ``tx=conn`` through an SQLAlchemy ``Session`` (psycopg 3 underneath);
- ``enqueue_many`` / ``enqueue_many tx=conn``: 100 jobs a call (a transaction a call).

Uses databases 8 (results), 10 (epq on Redis) and 11 (the state next to RabbitMQ) of ``--redis``,
flushed; the RabbitMQ queues of epq, purged; in PostgreSQL a schema of its own, dropped at the
end. Run it on servers of its own (``brokers/redis-start``, ``brokers/rabbitmq-start``).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import redis
import sqlalchemy
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

import epq  # noqa: E402
from epq import _runtime  # noqa: E402
from epq.outbox import schema_sql  # noqa: E402
from epq.settings import reset_settings  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def request(n: int, sent_at: float | None = None) -> dict[str, Any]:
    """A register_job request of its own key (``sent_at``: reported by the handler)."""
    metadata: dict[str, Any] = {"n": n} if sent_at is None else {"sent_at": sent_at}
    return {"endpoint_id": str(uuid.uuid4()), "job_id": f"bench-{n}", "job_metadata": metadata}


class Setup:
    """One broker's URLs, and this process set up on it with the outbox table."""

    def __init__(self, name: str, broker_url: str, state_url: str | None, table: str, postgres: str) -> None:
        self.name, self.broker_url, self.state_url, self.table, self.postgres = (
            name, broker_url, state_url, table, postgres,
        )  # fmt: skip
        os.environ.update(EPQ_OUTBOX_TABLE=table, EPQ_TRACING="0")
        os.environ.pop("EPQ_OUTBOX_URL", None)
        reset_settings()
        self.broker = _runtime.install(broker_url, state_url=state_url).broker
        self.svc = epq.QueueService(self.broker)

    def env(self, **more: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
        env.update(EPQ_BROKER_URL=self.broker_url, EPQ_OUTBOX_TABLE=self.table, EPQ_TRACING="0")
        env.update(EPQ_HANDLERS="benchmarks.epq_handlers", PYTHONPATH=str(ROOT), **more)
        if self.state_url:
            env["EPQ_STATE_URL"] = self.state_url
        return env


# ---- latency ------------------------------------------------------------------------------------


def latency(setup: Setup, results: redis.Redis, jobs: int, *, in_worker: bool) -> list[float]:
    """Commit-to-start times (ms) of ``jobs`` transactions, each committed to idle workers."""
    results.flushdb()
    with psycopg.connect(setup.postgres, autocommit=True) as connection:
        connection.execute(f"TRUNCATE {setup.table}")  # (no backlog left by the rate rounds)
    worker_env = setup.env(BENCH_RESULTS_URL=results_url(results), BENCH_TARGET="0")
    if in_worker:
        worker_env["EPQ_OUTBOX_URL"] = setup.postgres
    procs = [_start([str(BIN / "dramatiq"), "epq.actors", "-p", "1", "-t", "2"], worker_env)]
    if not in_worker:
        relay_env = {**worker_env, "EPQ_OUTBOX_URL": setup.postgres}
        procs.append(_start([str(BIN / "epq"), "relay"], relay_env))
    try:
        with psycopg.connect(setup.postgres) as connection:
            _commit(setup, connection, -1)  # the probe: all is up once it ran
            _wait(results, 1, 60)
            results.delete("bench:latency")
            for n in range(jobs):
                time.sleep(random.uniform(0.02, 0.06))
                _commit(setup, connection, n)
            _wait(results, jobs + 1, 60)
        return [float(v) for v in results.lrange("bench:latency", 0, -1)]
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


def _commit(setup: Setup, connection: Any, n: int) -> None:
    """One transaction enqueueing one job, which carries the time the enqueue began."""
    setup.svc.enqueue_register_job(request(n, time.time()), tx=connection)
    connection.commit()


def _wait(results: redis.Redis, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while int(results.get("bench:count") or 0) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {int(results.get('bench:count') or 0)} of {count} jobs ran")
        time.sleep(0.01)


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def results_url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    password = kwargs.get("password")
    auth = f":{password}@" if password else ""
    return f"redis://{auth}{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


# ---- rates --------------------------------------------------------------------------------------


def rates(setup: Setup, n: int, rounds: int, endpoints: str) -> dict[str, float]:
    """Jobs per second of each way to enqueue (median of ``rounds`` alternating rounds)."""
    engine = sqlalchemy.create_engine(setup.postgres.replace("postgresql://", "postgresql+psycopg://", 1))
    svc = setup.svc
    with psycopg.connect(setup.postgres, autocommit=True) as connection, Session(engine) as session:

        def plain(i: int) -> None:
            svc.enqueue_register_job(request(i))

        def in_tx(i: int) -> None:
            with connection.transaction():
                svc.enqueue_register_job(request(i), tx=connection)

        def app_write(i: int) -> None:
            with connection.transaction():
                connection.execute(f"INSERT INTO {endpoints} (id) VALUES (%s)", (uuid.uuid4(),))

        def app_write_tx(i: int) -> None:
            with connection.transaction():
                connection.execute(f"INSERT INTO {endpoints} (id) VALUES (%s)", (uuid.uuid4(),))
                svc.enqueue_register_job(request(i), tx=connection)

        def in_session(i: int) -> None:
            with session.begin():
                svc.enqueue_register_job(request(i), tx=session)

        def many(i: int) -> None:
            svc.enqueue_many([("register_job", request(i * 100 + k)) for k in range(100)])

        def many_tx(i: int) -> None:
            with connection.transaction():
                svc.enqueue_many([("register_job", request(i * 100 + k)) for k in range(100)], tx=connection)

        ways: dict[str, tuple[Callable[[int], None], int]] = {
            "enqueue_*": (plain, 1),
            "tx=conn": (in_tx, 1),
            "app write": (app_write, 1),
            "app write + tx=conn": (app_write_tx, 1),
            "tx=session": (in_session, 1),
            "enqueue_many": (many, 100),
            "enqueue_many tx=conn": (many_tx, 100),
        }
        for fn, _ in ways.values():
            fn(10**6)  # warm up: connections, scripts
        measured: dict[str, list[float]] = {name: [] for name in ways}
        offset = 0
        for r in range(rounds):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for name in order:
                fn, per_call = ways[name]
                calls = max(1, n // per_call)
                connection.execute(f"TRUNCATE {setup.table}")
                start = time.perf_counter()
                for i in range(calls):
                    fn(offset + i)
                elapsed = time.perf_counter() - start
                offset += calls
                measured[name].append(calls * per_call / elapsed)
        connection.execute(f"TRUNCATE {setup.table}")
    engine.dispose()
    return {name: statistics.median(values) for name, values in measured.items()}


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", required=True, help="a Redis server of the benchmark's own (no database)")
    parser.add_argument("--rabbitmq", help="a RabbitMQ of the benchmark's own (else Redis only)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=1000, help="jobs a round per way to enqueue")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--brokers", default="redis,rabbitmq", help="comma-separated: redis, rabbitmq")
    args = parser.parse_args()

    server = args.redis.rstrip("/")
    results = redis.Redis.from_url(f"{server}/8")
    schema = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    table, endpoints = f"{schema}.outbox", f"{schema}.endpoints"
    admin = psycopg.connect(args.postgres, autocommit=True)
    admin.execute(schema_sql(table))
    admin.execute(f"CREATE TABLE {endpoints} (id uuid PRIMARY KEY)")
    wanted = args.brokers.split(",")
    setups = [("redis", f"{server}/10", None)] if "redis" in wanted else []
    if args.rabbitmq and "rabbitmq" in wanted:
        setups.append(("rabbitmq", args.rabbitmq, f"{server}/11"))
    report: dict[str, dict[str, Any]] = {}
    try:
        for name, broker_url, state_url in setups:
            for db in (10, 11):
                redis.Redis.from_url(f"{server}/{db}").flushdb()
            setup = Setup(name, broker_url, state_url, table, args.postgres)
            if name == "rabbitmq":
                setup.broker.flush_all()  # type: ignore[attr-defined]
            print(f"{name}: latency (relay in the worker)...", file=sys.stderr, flush=True)
            in_worker = latency(setup, results, args.latency_jobs, in_worker=True)
            print(f"{name}: latency (epq relay)...", file=sys.stderr, flush=True)
            alone = latency(setup, results, args.latency_jobs, in_worker=False)
            print(f"{name}: enqueue rates...", file=sys.stderr, flush=True)
            report[name] = {
                "in worker": in_worker,
                "epq relay": alone,
                "rates": rates(setup, args.n, args.rounds, endpoints),
            }
            _runtime.reset()
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()

    print("\ncommit to start (ms), idle workers; an upper bound of commit to available")
    print(f"{'broker':<10} {'relay':<10} {'jobs':>5} {'p50':>8} {'p99':>8} {'max':>8}")
    for name, data in report.items():
        for where in ("in worker", "epq relay"):
            values = data[where]
            print(f"{name:<10} {where:<10} {len(values):>5} {_pct(values, 0.5):>8.1f} "
                  f"{_pct(values, 0.99):>8.1f} {max(values):>8.1f}")  # fmt: skip
    print("\nenqueue rate (jobs/s; median of rounds) and against plain enqueue_*")
    names = list(next(iter(report.values()))["rates"])
    print(f"{'way':<22}" + "".join(f" {name:>10} {'x plain':>8}" for name in report))
    for way in names:
        line = f"{way:<22}"
        for data in report.values():
            rate, base = data["rates"][way], data["rates"]["enqueue_*"]
            line += f" {rate:>10.0f} {rate / base:>8.2f}"
        print(line)


if __name__ == "__main__":
    main()
