"""A plain Dramatiq app the benchmarks run workers on: one no-op actor on BENCH_BROKER_URL."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

_url = os.environ["BENCH_BROKER_URL"]
broker: dramatiq.Broker = (
    RabbitmqBroker(url=_url, confirm_delivery=True) if _url.startswith("amqp") else RedisBroker(url=_url)
)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="default", actor_name="plain_job", max_retries=0)
def plain_job(n: int) -> None:
    """Does nothing."""
