"""The RabbitMQ backend: the broker (``broker``) and ``epq migrate-queues`` (``migrate``). epq's
state and records live in a Redis beside it (``epq.backends.redis.store``)."""
