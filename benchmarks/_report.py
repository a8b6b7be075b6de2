"""What the benchmarks' jobs do: note themselves in the results Redis, nothing else.

One script call per job (same for plain Dramatiq and epq): count it, note when the first one
started and when the count reached BENCH_TARGET, and, for a job that carries the time it was
sent, how long it waited to start.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'NX')
if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[4], ARGV[3]) end
if n >= tonumber(ARGV[2]) then redis.call('SET', KEYS[3], ARGV[1], 'NX') end
return n
"""
_script: Any = None  # made on the first report, from BENCH_RESULTS_URL as compare.py set it
KEYS = ["bench:count", "bench:first", "bench:last", "bench:latency"]


def report(sent_at: float | None = None) -> None:
    global _script
    now = time.time()
    target = os.environ.get("BENCH_TARGET", "0")
    waited = "" if sent_at is None else f"{(now - sent_at) * 1000:.3f}"
    if _script is None:
        client = redis.Redis.from_url(os.environ.get("BENCH_RESULTS_URL", "redis://127.0.0.1:6379/8"))
        _script = client.register_script(_SCRIPT)
    _script(keys=KEYS, args=[f"{now:.6f}", target, waited])
