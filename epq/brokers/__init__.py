"""Broker factory: Redis, RabbitMQ, the embedded Redis, or the stub broker, from one URL."""

from .factory import build_broker, display_url, redis_client, unreachable_errors
from .urls import mask_url, scheme_of

__all__ = ["build_broker", "display_url", "mask_url", "redis_client", "scheme_of", "unreachable_errors"]
