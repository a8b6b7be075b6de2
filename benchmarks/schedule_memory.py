"""Worker memory and unacknowledged messages with many scheduled jobs: plain Dramatiq vs epq.

    python benchmarks/schedule_memory.py [--jobs 10000] [--delay-s 3600] [--settle-s 8]

For Redis and for RabbitMQ (+ Redis state), in the same run: start one worker process
(`dramatiq … --processes 1 --threads 8`), note its RSS when idle, enqueue JOBS jobs delayed by
DELAY_S, wait SETTLE_S, and note its RSS again, with how many messages the broker holds as
unacknowledged (delivered to the worker, held in its memory until due) and how many wait
durably (Dramatiq's delay queue, or epq's schedule). Plain Dramatiq delays with its `.DQ` queues;
epq keeps the jobs in its state store's schedule. Uses Redis database 12 (flushed) and purges
the queues it uses on RabbitMQ.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dramatiq
import psutil
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _noop(n: int) -> None:
    pass


def worker_rss_mb(proc: subprocess.Popen[bytes]) -> float:
    """RSS of the worker processes (the children of Dramatiq's main process), in MiB."""
    children = psutil.Process(proc.pid).children(recursive=True)
    return sum(c.memory_info().rss for c in children) / 2**20


def rabbit_counts(queue: str) -> tuple[int, int]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    return 0, 0


def redis_unacked(client: redis.Redis[bytes]) -> int:
    return sum(int(client.scard(k)) for k in client.keys("*__acks__*"))


def run(
    label: str,
    module: str,
    env: dict[str, str],
    jobs: int,
    delay_s: int,
    settle_s: float,
    broker_url: str,
    state: redis.Redis[bytes],
) -> tuple[str, float, float, int, int]:
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [str(BIN / "dramatiq"), module, "--processes", "1", "--threads", "8"],
        env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(3)
        idle = worker_rss_mb(proc)
        if module == "epq.actors":
            from epq import _runtime

            _runtime.install(broker_url, state_url=env.get("EPQ_STATE_URL"))
            from epq import actors

            for i in range(jobs):
                actors.register_job.send_with_options(
                    kwargs={"endpoint_id": str(uuid.uuid4()), "job_id": f"j{i}", "job_metadata": {}},
                    delay=delay_s * 1000,
                )
            _runtime.reset()
        else:
            sender: dramatiq.Broker = (
                RabbitmqBroker(url=broker_url, confirm_delivery=True)
                if broker_url.startswith("amqp")
                else RedisBroker(url=broker_url)
            )
            plain_job = dramatiq.Actor(
                _noop, broker=sender, actor_name="plain_job", queue_name="default", priority=0, options={}
            )
            for i in range(jobs):
                plain_job.send_with_options(args=(i,), delay=delay_s * 1000)
            sender.close()
        time.sleep(settle_s)
        loaded = worker_rss_mb(proc)
        if broker_url.startswith("amqp"):
            durable, unacked = rabbit_counts("default.DQ")
            if module == "epq.actors":
                durable = int(state.hlen("epq:schedule:data"))
        else:
            unacked = redis_unacked(state)
            durable = int(state.llen("dramatiq:default.DQ")) + int(state.hlen("epq:schedule:data"))
        return label, idle, loaded, unacked, durable
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--delay-s", type=int, default=3600)
    parser.add_argument("--settle-s", type=float, default=8.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = parser.parse_args()
    state: redis.Redis[bytes] = redis.Redis.from_url(args.redis)

    def clean() -> None:
        state.flushdb()
        for q in ("default", "default.DQ", "default.XQ"):
            subprocess.run(["rabbitmqctl", "-q", "purge_queue", q], capture_output=True)

    rows = []
    plain, rmq = "benchmarks.plain_app", args.rabbitmq
    plans = [
        ("redis", "plain Dramatiq", plain, {"BENCH_BROKER_URL": args.redis}, args.redis),
        ("redis", "epq", "epq.actors", {"EPQ_BROKER_URL": args.redis}, args.redis),
        ("rabbitmq", "plain Dramatiq", plain, {"BENCH_BROKER_URL": rmq}, rmq),
        ("rabbitmq", "epq", "epq.actors", {"EPQ_BROKER_URL": rmq, "EPQ_STATE_URL": args.redis}, rmq),
    ]
    try:
        for broker, label, module, env, url in plans:
            clean()
            rows.append(
                (broker, *run(label, module, env, args.jobs, args.delay_s, args.settle_s, url, state))
            )
    finally:
        clean()

    print(
        f"{args.jobs} jobs delayed {args.delay_s} s; one worker process, 8 threads; after {args.settle_s} s:"
    )
    print(f"{'broker':<9} {'app':<15} {'idle RSS MiB':>12} {'loaded RSS MiB':>15} {'growth':>8} "
          f"{'unacked in worker':>18} {'waiting durably':>16}")  # fmt: skip
    for broker, label, idle, loaded, unacked, durable in rows:
        growth = (loaded - idle) / idle * 100
        sizes = f"{idle:>12.1f} {loaded:>15.1f} {growth:>7.1f}%"
        print(f"{broker:<9} {label:<15} {sizes} {unacked:>18} {durable:>16}")


if __name__ == "__main__":
    main()
