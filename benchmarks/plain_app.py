"""The plain Dramatiq app the benchmarks run workers on: one actor on BENCH_BROKER_URL, queue
``bench-plain`` (its own name, so that it never meets epq's priority queues on RabbitMQ)."""

from __future__ import annotations

import os

import dramatiq

from benchmarks._report import report

QUEUE = "bench-plain"
_url = os.environ["BENCH_BROKER_URL"]
broker: dramatiq.Broker
# each broker module only where it is used, as an application on one broker would (the idle RSS
# compared in footprint.py would otherwise count pika in a Redis worker)
if _url.startswith("amqp"):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=_url, confirm_delivery=True)
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=_url, namespace="benchplain")
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, actor_name="plain_job", max_retries=0)
def plain_job(n: int, sent_at: float | None = None) -> None:
    report(sent_at)
