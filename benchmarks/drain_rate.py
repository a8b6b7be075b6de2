"""Drain rate (no-op jobs processed per second) of plain Dramatiq vs epq with all its middleware.

    python benchmarks/drain_rate.py [--n 3000] [--threads 8]

For Redis and RabbitMQ (+ Redis state), in the same run: enqueue N no-op jobs, then start one
in-process worker with THREADS threads and time how long it takes to run them all. epq's worker
writes each job's record twice (running, then completed) and checks for cancellation; plain
Dramatiq writes nothing. Uses Redis database 12 (flushed) and purges the queues it uses on
RabbitMQ.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from epq import _runtime, handlers


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.target = 0

    def hit(self, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.n += 1
            if self.n >= self.target:
                self.done.set()


def drain(broker: dramatiq.Broker, counter: Counter, n: int, threads: int) -> float:
    counter.target = n
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    start = time.perf_counter()
    worker.start()
    if not counter.done.wait(timeout=300):
        raise SystemExit(f"only {counter.n} of {n} jobs ran")
    elapsed = time.perf_counter() - start
    worker.stop()
    return n / elapsed


def plain_rate(broker: dramatiq.Broker, n: int, threads: int) -> float:
    counter = Counter()
    actor = dramatiq.Actor(
        counter.hit, broker=broker, actor_name="bench_noop", queue_name="bench", priority=0, options={}
    )
    for i in range(n):
        actor.send(i)
    rate = drain(broker, counter, n, threads)
    broker.close()
    return rate


def epq_rate(url: str, state_url: str | None, n: int, threads: int) -> float:
    broker = _runtime.install(url, state_url=state_url).broker
    from epq import actors

    counter = Counter()
    with handlers.isolated_handlers():
        handlers.register("register_job", counter.hit)
        endpoint = str(uuid.uuid4())
        for i in range(n):
            actors.register_job.send(endpoint_id=endpoint, job_id=f"j{i}", job_metadata={})
        rate = drain(broker, counter, n, threads)
    _runtime.reset()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = parser.parse_args()
    state: redis.Redis[bytes] = redis.Redis.from_url(args.redis)
    rows = []
    try:
        state.flushdb()
        plain = plain_rate(RedisBroker(url=args.redis, namespace="benchplain"), args.n, args.threads)
        ours = epq_rate(args.redis, None, args.n, args.threads)
        rows.append(("redis", plain, ours))
        state.flushdb()
        rmq = RabbitmqBroker(url=args.rabbitmq, confirm_delivery=True)
        rmq.declare_queue("bench", ensure=True)
        rmq.flush("bench")
        plain = plain_rate(rmq, args.n, args.threads)
        ours = epq_rate(args.rabbitmq, args.redis, args.n, args.threads)
        rows.append(("rabbitmq+redis", plain, ours))
    finally:
        state.flushdb()
    print(f"{args.n} no-op jobs, one worker process with {args.threads} threads")
    print(f"{'broker':<15} {'plain Dramatiq jobs/s':>22} {'epq jobs/s':>11} {'epq / plain':>12}")
    for broker, plain, ours in rows:
        print(f"{broker:<15} {plain:>22.0f} {ours:>11.0f} {ours / plain:>11.2f}x")


if __name__ == "__main__":
    main()
