"""Redis's listing indexes: positions of expired records are dropped by the sweep."""

from __future__ import annotations

import pytest
import redis

from epq.backends.base import NewRecord
from epq.backends.redis.store import RedisRecords
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.redis
T0 = 1_700_000_000_000


def test_the_sweep_drops_expired_records_from_every_index(redis_client: redis.Redis) -> None:
    records = RedisRecords(redis.Redis.from_url(REDIS_URL), lambda: T0)
    base = {"kind": "register_job", "queue": "default", "priority": "2", "max_attempts": "3"}
    for n in range(5):
        fields = {**base, "state": "available", "created_at": str(T0 + n), "endpoint_id": f"e{n % 2}"}
        records.create(NewRecord(f"job-{n}", fields, 60_000 if n != 2 else 1))
    # Given a record that expired (Redis drops its key without a script)
    redis_client.delete("epq:job:job-1")
    # When the indexes are swept
    dropped = records.prune_indexes(1000)
    # Then it is gone from each of its six indexes (every record, state, kind, queue, priority,
    # endpoint), with the one that expired by its TTL, and the others stay
    assert dropped == 12
    assert records.prune_indexes(1000) == 0
    ids, _ = records.list_ids({"endpoint_id": "e1"}, newest_first=False, after=None, limit=10)
    assert ids == ["job-3"]
    ids, _ = records.list_ids({}, newest_first=False, after=None, limit=10)
    assert ids == ["job-0", "job-3", "job-4"]
