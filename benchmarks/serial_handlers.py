"""The serial benchmark's handler (EPQ_HANDLERS=benchmarks.serial_handlers): a registration that
notes its start (checking, in the same step, whether another job of its endpoint is running),
works for BENCH_JOB_MS, and notes its end."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

import epq

# KEYS: running (hash endpoint -> jobs running), overlaps (counter), starts list prefix, count,
# first start; ARGV: endpoint, seq, now
_START = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if n > 1 then redis.call('INCR', KEYS[2]) end
redis.call('RPUSH', KEYS[3] .. ARGV[1], ARGV[2])
redis.call('SET', KEYS[4], ARGV[3], 'NX')
return n
"""
# KEYS: running, done (counter), last end; ARGV: endpoint, now
_END = """
redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], ARGV[2])
"""
_client = redis.Redis.from_url(os.environ["BENCH_RESULTS_URL"])
_start, _end = _client.register_script(_START), _client.register_script(_END)
_work_s = float(os.environ.get("BENCH_JOB_MS", "20")) / 1000


@epq.handler("register_job")
def register(request: Any) -> None:
    endpoint = str(request.endpoint_id)
    seq = request.job_metadata["seq"]
    _start(
        keys=["serial:running", "serial:overlaps", "serial:starts:", "serial:first"],
        args=[endpoint, seq, f"{time.time():.6f}"],
    )
    try:
        time.sleep(_work_s)
    finally:
        _end(keys=["serial:running", "serial:done", "serial:last"], args=[endpoint, f"{time.time():.6f}"])
