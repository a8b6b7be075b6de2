"""What epq's metrics cost a worker and an enqueue: the same work with metrics on and off, in
alternating rounds of one process (so that a busy machine's drift falls on both alike).

    python benchmarks/metrics_cost.py                  # about 30 s
    python benchmarks/metrics_cost.py --rounds 9 --n 4000

On the stub broker by default (no network: what is left is epq's and the metrics' own CPU), or
on ``--broker`` (the CPU of this process: the client's and the worker's, not the server's):

- enqueue: ``--n`` jobs sent one by one (``register_job``, uniqueness on);
- drain: ``--n`` waiting no-op jobs run by an in-process worker of ``--threads`` threads.

Each is measured as CPU time per job (``time.process_time``), which other processes on a busy
machine disturb far less than wall-clock rates do.

"On" is the worker-side metrics in ``prometheus_client``'s multiprocess mode, as a worker with
``EPQ_METRICS_PORT`` keeps them (values in files; the most expensive mode); "off" is the same
broker with the metrics disabled (``epq.metrics.disable``). Prints the median of each and on/off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import dramatiq
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import epq  # noqa: E402
from epq import _runtime, handlers, metrics  # noqa: E402
from epq.testing import drain  # noqa: E402

ENDPOINT = "6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f"


def _noop(request: Any) -> None:
    pass


def enqueue_cost(n: int) -> float:
    """CPU microseconds per job sent."""
    actor = epq.actors.register_job
    ids = [uuid.uuid4().hex for _ in range(n)]
    started = time.process_time()
    for job_id in ids:
        actor.send(endpoint_id=ENDPOINT, job_id=job_id, job_metadata={})
    return (time.process_time() - started) / n * 1e6


def drain_cost(broker: dramatiq.Broker, n: int, threads: int) -> float:
    """CPU microseconds per job run (the worker's threads and the drain's polling)."""
    svc = epq.QueueService(broker)
    for start in range(0, n, 500):
        svc.enqueue_many(
            [
                ("register_job", {"endpoint_id": ENDPOINT, "job_id": uuid.uuid4().hex, "job_metadata": {}})
                for _ in range(min(500, n - start))
            ]
        )
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=20)
    started = time.process_time()
    worker.start()
    try:
        drain(broker, worker)
        return (time.process_time() - started) / n * 1e6
    finally:
        worker.stop()


def fresh(url: str, state: str | None) -> dramatiq.Broker:
    """epq set up on ``url``, its queues and state emptied."""
    broker = _runtime.install(url, state_url=state).broker
    flush = getattr(broker, "flush_all", None)
    if flush is not None:
        flush()
    for store_url in (url, state):
        if store_url and store_url.startswith("redis://"):
            redis.Redis.from_url(store_url).flushdb()
    return broker


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=3000, help="jobs per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each, alternating")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--broker", default="stub://",
        help="a broker URL (redis://... : a database of its own, flushed; amqp://... with --state)",
    )  # fmt: skip
    parser.add_argument("--state", help="the state Redis next to RabbitMQ (flushed)")
    args = parser.parse_args()

    # the worker-side metrics as a worker with EPQ_METRICS_PORT keeps them: in files
    os.environ[metrics.MULTIPROC_ENV] = tempfile.mkdtemp(prefix="epq-metrics-cost-")
    os.environ.update(EPQ_METRICS="1", EPQ_TRACING="0")
    for kind in ("index_endpoint", "register_job", "register_source", "register_dynamic_trigger",
                 "register_dynamic_schedule"):  # fmt: skip
        handlers.register(kind, _noop, replace=True)
    rates: dict[str, dict[str, list[float]]] = {
        "enqueue": {"on": [], "off": []},
        "drain": {"on": [], "off": []},
    }
    for round_number in range(args.rounds):
        order = ("on", "off") if round_number % 2 == 0 else ("off", "on")
        for mode in order:
            broker = fresh(args.broker, args.state)
            if mode == "off":
                metrics.disable()
            else:
                metrics.enable()
            rates["enqueue"][mode].append(enqueue_cost(args.n))
            broker = fresh(args.broker, args.state)  # a fresh store: the same work each round
            if mode == "off":
                metrics.disable()  # (set up again, epq enabled them: EPQ_METRICS=1)
            rates["drain"][mode].append(drain_cost(broker, args.n, args.threads))
    print(f"{'measure':24} {'off':>10} {'on':>10} {'on/off':>8}")
    for measure, by_mode in rates.items():
        off, on = statistics.median(by_mode["off"]), statistics.median(by_mode["on"])
        print(f"{measure + ' (CPU us/job)':24} {off:10.1f} {on:10.1f} {on / off:8.3f}")
        for mode in ("off", "on"):
            print(f"  {mode:4} rounds: {' '.join(f'{r:.1f}' for r in by_mode[mode])}")
    print(f"{args.broker}, {args.rounds} rounds of {args.n} jobs each, median; {args.threads} worker threads")


if __name__ == "__main__":
    main()
