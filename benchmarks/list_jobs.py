"""A page of ``QueueService.list_jobs`` with many records: read from the listing indexes, against
a scan of the records (what a listing without the indexes would have to do), in the same run.

    python benchmarks/list_jobs.py --redis redis://127.0.0.1:6541     # a private server; ~1 min

Writes ``--n`` jobs (100,000 by default) through the bulk enqueue path (``enqueue_many``: one
script call per few hundred jobs), of two kinds, two queues, four priorities and ``--n / 100``
endpoints (each index_endpoint job, unique by endpoint, has one of its own), then moves some of
them on (one round trip per few thousand transitions): 40 % completed, 5 % discarded, 5 %
scheduled, the rest waiting. Then, for each filter, the median
time of ``--rounds`` calls of ``list_jobs(limit=50)`` (the first page, newest first; and a page
deep in the listing, through its cursor), beside one scan of every record for the same page.
Also prints the Redis memory the indexes take per job (``MEMORY USAGE`` of every index).

Uses database 13 of ``--redis``, flushed before and after: run it against a server of its own
(``brokers/redis-start``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import epq  # noqa: E402
import epq.testing  # noqa: E402
from epq.backends.base import Move  # noqa: E402
from epq.backends.redis import keys  # noqa: E402

DB = 13
PAGE = 50
CHUNK = 5000


def _db_url(base: str, db: int) -> str:
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}/{db}"


def _endpoint(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def write_jobs(service: epq.QueueService, n: int) -> list[str]:
    """``n`` jobs through the bulk path; their ids in order."""
    endpoints = max(1, n // 100)
    ids: list[str] = []
    for start in range(0, n, CHUNK):
        batch: list[tuple[str, dict[str, Any]]] = []
        for i in range(start, min(n, start + CHUNK)):
            common = {"endpoint_id": _endpoint(i % endpoints), "priority": 1 + i % 4}
            common["queue_name"] = "events" if i % 3 == 0 else "default"
            if i % 2:  # (unique by endpoint and source: an endpoint of its own each)
                common["endpoint_id"] = _endpoint(endpoints + i)
                batch.append(("index_endpoint", {**common, "source": "API", "source_data": {"i": i}}))
            else:
                batch.append(("register_job", {**common, "job_id": f"j{i}", "job_metadata": {"i": i}}))
        ids += [result.job.id for result in service.enqueue_many(batch)]
    return ids


def move_some(records: Any, ids: list[str], now_ms: int) -> None:
    """Completed (40 %), discarded (5 %), scheduled (5 %); the rest stay available."""
    day = 24 * 3600 * 1000
    moves = []
    for i, job_id in enumerate(ids):
        slot = i % 20
        if slot < 8:
            moves.append(Move(job_id, "completed", {"finalized_at": str(now_ms), "args": "{}"}, day))
        elif slot == 8:
            moves.append(Move(job_id, "discarded", {"finalized_at": str(now_ms), "args": "{}"}, 7 * day))
        elif slot == 9:
            moves.append(Move(job_id, "scheduled", {"scheduled_at": str(now_ms + 3600_000)}, 30 * day))
    for start in range(0, len(moves), CHUNK):
        records.move_many(moves[start : start + CHUNK])


def page_ms(
    service: epq.QueueService, filters: dict[str, Any], rounds: int, cursor: str | None = None
) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        page = service.list_jobs(**filters, limit=PAGE, cursor=cursor)
        times.append((time.perf_counter() - t0) * 1000)
    assert len(page.jobs) <= PAGE
    return statistics.median(times)


def scan_ms(client: redis.Redis, filters: dict[str, str]) -> float:
    """The same first page without the indexes: every record's fields read (SCAN, pipelined
    HMGETs), filtered, sorted newest first, cut to a page."""
    t0 = time.perf_counter()
    names = ["created_at", *filters]
    found: list[tuple[str, str]] = []
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.hmget(key, names)
        for key, values in zip(batch, pipe.execute(), strict=True):
            text = [v.decode() if v is not None else None for v in values]
            if text[0] is not None and all(t == v for t, v in zip(text[1:], filters.values(), strict=True)):
                found.append((text[0], key.decode()))
        batch.clear()

    for key in client.scan_iter(match=keys.JOB_PREFIX + "*", count=2000):
        batch.append(key)
        if len(batch) >= 2000:
            flush()
    flush()
    found.sort(reverse=True)
    page = found[:PAGE]
    pipe = client.pipeline(transaction=False)
    for _, key in page:
        pipe.hgetall(key)
    pipe.execute()
    return (time.perf_counter() - t0) * 1000


def index_bytes(client: redis.Redis) -> int:
    total = 0
    for key in client.scan_iter(match=keys.INDEX_PREFIX + "*", count=1000):
        total += int(client.memory_usage(key, samples=0) or 0)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis (database 13, flushed)")
    parser.add_argument("--n", type=int, default=100_000, help="jobs written (default 100,000)")
    parser.add_argument("--rounds", type=int, default=21, help="calls per filter (the median is printed)")
    parser.add_argument("--no-scan", action="store_true", help="skip the scan column")
    args = parser.parse_args()

    url = _db_url(args.redis, DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    broker = epq.testing.install(url)
    service = epq.QueueService(broker)
    records = epq.testing.backend(broker).records
    records.completed_max = records.dead_max = 10 * args.n  # type: ignore[attr-defined]  # (keep them all)

    t0 = time.perf_counter()
    ids = write_jobs(service, args.n)
    written_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    move_some(records, ids, int(time.time() * 1000))
    moved_s = time.perf_counter() - t0
    deep = service.list_jobs(limit=PAGE)
    for _ in range(args.n // 2 // PAGE // 20):  # (a cursor about half-way down, pages of 1000)
        deep = service.list_jobs(limit=1000, cursor=deep.next_cursor)

    one_endpoint = _endpoint(8)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("(none)", {}),
        ("state=available", {"state": "available"}),
        ("state=completed", {"state": "completed"}),
        ("state=discarded", {"state": "discarded"}),
        ("state=scheduled", {"state": "scheduled"}),
        ("kind=index_endpoint", {"kind": "index_endpoint"}),
        ("queue=events", {"queue": "events"}),
        ("priority=1", {"priority": 1}),
        ("endpoint_id=<one of n/100>", {"endpoint_id": one_endpoint}),
        ("state=discarded kind=register_job", {"state": "discarded", "kind": "register_job"}),
        ("endpoint_id + state=completed", {"endpoint_id": one_endpoint, "state": "completed"}),
        ("queue=events priority=4 kind=...", {"queue": "events", "priority": 4, "kind": "index_endpoint"}),
    ]
    print(f"{'filter':36} {'jobs':>7} {'page 1 ms':>10} {'deep ms':>8} {'scan ms':>9} {'scan/page':>10}")
    print("-" * 84)
    worst = 0.0
    for label, filters in cases:
        matching = sum(1 for _ in service.iter_jobs(**filters))
        first = page_ms(service, filters, args.rounds)
        later = page_ms(service, {}, args.rounds, deep.next_cursor) if not filters else float("nan")
        worst = max(worst, first)
        stored = epq.service.listing_filters(**filters)
        scan = float("nan") if args.no_scan else scan_ms(client, stored)
        ratio = f"{scan / first:9.0f}x" if scan == scan else "-"
        deep_text = f"{later:8.2f}" if later == later else f"{'-':>8}"
        scan_text = f"{scan:9.0f}" if scan == scan else f"{'-':>9}"
        print(f"{label:36} {matching:7} {first:10.2f} {deep_text} {scan_text} {ratio:>10}")
    per_job = index_bytes(client) / args.n
    print(
        f"\n{args.n} jobs written in {written_s:.1f} s (bulk enqueue), {len(ids) // 2} moved on in "
        f"{moved_s:.1f} s; median of {args.rounds} calls of list_jobs(limit={PAGE}) per filter "
        f"(records read included); deep: a page half-way down, by its cursor; scan: one run.\n"
        f"Listing indexes: {per_job:.0f} bytes of Redis per job. Slowest first page: {worst:.2f} ms "
        f"({'under' if worst < 100 else 'OVER'} the 100 ms bar)."
    )
    epq.testing.reset()
    client.flushdb()
    client.close()


if __name__ == "__main__":
    main()
