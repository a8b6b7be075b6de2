"""What uniqueness costs per enqueue: Redis round trips and enqueue rate, against plain Dramatiq.

    python benchmarks/unique_cost.py [--n 2000] [--redis redis://127.0.0.1:6379/12]
                                     [--rabbitmq amqp://guest:guest@127.0.0.1:5672/%2F]

For each broker it enqueues N jobs three ways, in the same run:
  plain      a plain Dramatiq actor's send() (the baseline)
  epq-off    epq's index_endpoint.send() with uniqueness turned off (unique_for=0); it still
             writes the job's record
  epq        epq's index_endpoint.send() with its uniqueness window (every key distinct); the
             lock is taken in the same script that writes the record
and prints the enqueue rate, the ratio to plain Dramatiq, and the Redis round trips each enqueue
made (counted in this process: every request redis-py writes to a socket, a pipeline or a Lua
script being one). It flushes the Redis database it is given, and purges the queues it uses on
RabbitMQ.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from epq import _runtime

ROUND_TRIPS = [0]
_send_packed = redis.connection.AbstractConnection.send_packed_command


def _counting_send(self: Any, command: Any, check_health: bool = True) -> None:
    ROUND_TRIPS[0] += 1
    _send_packed(self, command, check_health)


redis.connection.AbstractConnection.send_packed_command = _counting_send  # type: ignore[method-assign]


def measure(n: int, send: Callable[[int], Any]) -> tuple[float, float]:
    """(enqueues per second, Redis round trips per enqueue)."""
    send(-1)  # warm up: connections, script loading
    ROUND_TRIPS[0] = 0
    start = time.perf_counter()
    for i in range(n):
        send(i)
    elapsed = time.perf_counter() - start
    return n / elapsed, ROUND_TRIPS[0] / n


def run(
    name: str, plain_broker: dramatiq.Broker, epq_url: str, state_url: str | None, n: int
) -> list[tuple[str, str, float, float, float]]:
    @dramatiq.actor(broker=plain_broker, queue_name="bench-plain", actor_name="bench_plain")
    def plain(endpoint_id: str, source: str) -> None: ...

    _runtime.install(epq_url, state_url=state_url)
    from epq import actors

    endpoints = [str(uuid.uuid4()) for _ in range(n + 1)]
    rows = []
    base, base_calls = measure(n, lambda i: plain.send(endpoint_id=endpoints[i], source="API"))
    rows.append((name, "plain Dramatiq send", base, 1.0, base_calls))
    rate, calls = measure(
        n,
        lambda i: actors.index_endpoint.send_with_options(
            kwargs={"endpoint_id": endpoints[i], "source": "MANUAL"}, unique_for=0
        ),
    )
    rows.append((name, "epq send, uniqueness off", rate, rate / base, calls))
    rate, calls = measure(n, lambda i: actors.index_endpoint.send(endpoint_id=endpoints[i], source="API"))
    rows.append((name, "epq send, uniqueness on", rate, rate / base, calls))
    _runtime.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = parser.parse_args()

    counter: redis.Redis[bytes] = redis.Redis.from_url(args.redis)
    counter.flushdb()
    rows = []
    try:
        rows += run("redis", RedisBroker(url=args.redis, namespace="bench"), args.redis, None, args.n)
        counter.flushdb()
        plain_rmq = RabbitmqBroker(url=args.rabbitmq, confirm_delivery=True)
        rows += run("rabbitmq+redis", plain_rmq, args.rabbitmq, args.redis, args.n)
        for q in ("bench-plain", "default"):
            plain_rmq.channel.queue_purge(q)
        plain_rmq.close()
    finally:
        counter.flushdb()

    print(f"{'broker':<15} {'what':<26} {'enqueues/s':>11} {'vs plain':>9} {'Redis trips/enqueue':>20}")
    for broker, what, rate, ratio, calls in rows:
        print(f"{broker:<15} {what:<26} {rate:>11.0f} {ratio:>8.2f}x {calls:>20.2f}")
    print("(plain Dramatiq on RabbitMQ publishes with confirms, as epq does; its Redis count is 0)")


if __name__ == "__main__":
    main()
