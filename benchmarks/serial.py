"""Serial keys: throughput with and without them, and proof that they hold, on Redis and RabbitMQ.

    python benchmarks/serial.py --redis redis://127.0.0.1:6520 \\
        --rabbitmq amqp://guest:guest@127.0.0.1:5820/%2F      # private servers; several minutes

For each broker, ``--jobs`` register_job requests over ``--endpoints`` endpoints (round robin,
so each endpoint's jobs are spread through the backlog) are enqueued one by one, then
``--processes`` worker processes of ``--threads`` threads drain them; each job works
``--job-ms`` (a registration's database write). Two runs per broker, with serial keys off and on
(``EPQ_SERIAL_KINDS``), in alternating order over ``--rounds`` rounds (the median run counts).

What is checked, in every run with serial keys on:
- every job's start checks, in the same atomic step on the results Redis, whether another job of
  its endpoint is running (``overlaps``: must be 0); and this process samples every endpoint's
  running count every ``--sample-ms`` as well (``most at once``: must be 1);
- per endpoint, the order the jobs started in equals the order they were enqueued in.

Throughput is jobs per second from the first start to the last end. The table prints both runs
and their ratio (serial / not serial; the target is 0.8 or more), and what each job cost in CPU
over that time: the worker processes' (user + system, from /proc) and the Redis server's that
keeps epq's state (``INFO cpu``; the results database is on it too, the same in both runs). On
a machine whose cores are busy with other work, CPU per job is what bounds the rate: the ratio of
the CPU figures says what the ratio of the rates would fall to. ``--busy N`` runs N processes
that spin on the CPU through every run, to see it.

Uses database 13 of ``--redis`` for epq (on RabbitMQ, for its state) and 14 for the results,
flushed; on RabbitMQ, epq's queues, purged.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from benchmarks._proc import cpu_seconds  # noqa: E402
from epq import _runtime  # noqa: E402
from epq.settings import reset_settings  # noqa: E402

RESULT_KEYS = ["serial:running", "serial:overlaps", "serial:first", "serial:done", "serial:last"]


class Sampler(threading.Thread):
    """Reads every endpoint's running count every ``interval_s``; keeps the most seen at once."""

    def __init__(self, client: redis.Redis, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.client, self.interval_s = client, interval_s
        self.most = 0
        self.samples = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            counts = self.client.hvals("serial:running")
            self.most = max([self.most, *(int(c) for c in counts)])
            self.samples += 1
            time.sleep(self.interval_s)


def redis_cpu_seconds(client: redis.Redis) -> float:
    """CPU time the Redis server has used so far (its main thread, user + system)."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def spinners(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` processes that keep a core busy until they are killed (``--busy``)."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(count)
    ]


def one_run(broker: str, serial: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Enqueue the backlog, drain it with worker processes; what the run measured."""
    base = args.redis.rstrip("/")
    results = redis.Redis.from_url(f"{base}/14")
    results.flushdb()
    env = {
        "EPQ_TRACING": "0",
        "EPQ_HANDLERS": "benchmarks.serial_handlers",
        "EPQ_SERIAL_KINDS": "all" if serial else "",
        "BENCH_RESULTS_URL": f"{base}/14",
        "BENCH_JOB_MS": str(args.job_ms),
    }
    if broker == "redis":
        redis.Redis.from_url(f"{base}/13").flushdb()
        env["EPQ_BROKER_URL"] = f"{base}/13"
    else:
        redis.Redis.from_url(f"{base}/13").flushdb()
        env["EPQ_BROKER_URL"] = args.rabbitmq
        env["EPQ_STATE_URL"] = f"{base}/13"
    os.environ.update(env)
    reset_settings()
    _runtime.reset()
    epq_broker = _runtime.setup(env["EPQ_BROKER_URL"], state_url=env.get("EPQ_STATE_URL"))
    if broker == "rabbitmq":
        epq_broker.flush_all()
    from epq import actors

    endpoints = [str(uuid.uuid4()) for _ in range(args.endpoints)]
    order: dict[str, list[str]] = {e: [] for e in endpoints}
    for i in range(args.jobs):
        endpoint = endpoints[i % len(endpoints)]
        actors.register_job.send(endpoint_id=endpoint, job_id=f"job-{i}", job_metadata={"seq": i})
        order[endpoint].append(str(i))
    sampler = Sampler(results, args.sample_ms / 1000)
    sampler.start()
    busy = spinners(args.busy)
    argv = [str(BIN / "dramatiq"), "epq.actors", "--processes", str(args.processes)]
    with open(args.log or os.devnull, "ab") as log:
        worker = subprocess.Popen(
            [*argv, "--threads", str(args.threads)],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    state = redis.Redis.from_url(f"{base}/13")
    cpu_at_start: tuple[float, float] | None = None
    try:
        deadline = time.monotonic() + args.timeout_s
        while int(results.get("serial:done") or 0) < args.jobs:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"only {int(results.get('serial:done') or 0)} of {args.jobs} jobs ran")
            if cpu_at_start is None and results.exists("serial:first"):
                cpu_at_start = (cpu_seconds(worker.pid), redis_cpu_seconds(state))
            time.sleep(0.02)
        worker_cpu, redis_cpu = cpu_seconds(worker.pid), redis_cpu_seconds(state)
    finally:
        for spinner in busy:
            spinner.kill()
            spinner.wait()
        sampler.stopped.set()
        sampler.join()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        _runtime.reset()
    first, last = float(results.get("serial:first") or 0), float(results.get("serial:last") or 0)
    in_order = sum(
        1
        for endpoint, sent in order.items()
        if [s.decode() for s in results.lrange(f"serial:starts:{endpoint}", 0, -1)] == sent
    )
    assert cpu_at_start is not None
    return {
        "jobs_per_s": args.jobs / (last - first),
        "worker_cpu_us": (worker_cpu - cpu_at_start[0]) / args.jobs * 1e6,
        "redis_cpu_us": (redis_cpu - cpu_at_start[1]) / args.jobs * 1e6,
        "overlaps": int(results.get("serial:overlaps") or 0),
        "most_at_once": sampler.most,
        "samples": sampler.samples,
        "in_order": in_order,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="redis,rabbitmq")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (databases 13-14)")
    parser.add_argument("--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--job-ms", type=float, default=20.0, help="how long each job works")
    parser.add_argument("--rounds", type=int, default=3, help="runs a side, alternating; the median counts")
    parser.add_argument("--sample-ms", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU during every run")
    parser.add_argument("--log", help="append the workers' logs to this file")
    args = parser.parse_args()
    rows = []
    ok = True
    for broker in args.brokers.split(","):
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for serial in (False, True) if round_ % 2 == 0 else (True, False):
                print(f"{broker}: serial keys {'on' if serial else 'off'}, round {round_ + 1} ...",
                      file=sys.stderr, flush=True)  # fmt: skip
                run = one_run(broker, serial, args)
                print(f"  {run}", file=sys.stderr, flush=True)
                runs[serial].append(run)
        rates = {serial: statistics.median(r["jobs_per_s"] for r in runs[serial]) for serial in runs}
        cpu = {
            (serial, measure): statistics.median(r[measure] for r in runs[serial])
            for serial in runs
            for measure in ("worker_cpu_us", "redis_cpu_us")
        }
        for serial in (False, True):
            overlaps = sum(r["overlaps"] for r in runs[serial])
            most = max(r["most_at_once"] for r in runs[serial])
            in_order = min(r["in_order"] for r in runs[serial])
            samples = sum(r["samples"] for r in runs[serial])
            rows.append((broker, "on" if serial else "off", rates[serial], overlaps, most, in_order, samples,
                         cpu[serial, "worker_cpu_us"], cpu[serial, "redis_cpu_us"]))  # fmt: skip
            if serial and (overlaps or most > 1 or in_order != args.endpoints):
                ok = False
        rows.append((broker, "ratio", rates[True] / rates[False], None, None, None, None,
                     cpu[True, "worker_cpu_us"] / cpu[False, "worker_cpu_us"],
                     cpu[True, "redis_cpu_us"] / cpu[False, "redis_cpu_us"]))  # fmt: skip
    print(f"\n{args.jobs} register_job jobs over {args.endpoints} endpoints, {args.job_ms:g} ms each; "
          f"{args.processes} worker processes x {args.threads} threads; "
          f"median of {args.rounds} runs"
          + (f"; {args.busy} processes spinning on the CPU" if args.busy else "") + "\n")  # fmt: skip
    head = ("broker", "serial", "jobs/s", "overlaps", "most at once", "endpoints in order", "samples",
            "worker CPU us/job", "Redis CPU us/job")  # fmt: skip
    print(f"{head[0]:<9} {head[1]:<7} {head[2]:>9} {head[3]:>9} {head[4]:>13} {head[5]:>19} {head[6]:>8} "
          f"{head[7]:>18} {head[8]:>17}")  # fmt: skip
    for broker, serial, rate, overlaps, most, in_order, samples, worker_cpu, redis_cpu in rows:
        if serial == "ratio":
            print(f"{broker:<9} {'on/off':<7} {rate:>9.2f} {'':>9} {'':>13} {'':>19} {'':>8} "
                  f"{worker_cpu:>18.2f} {redis_cpu:>17.2f}")  # fmt: skip
            continue
        print(f"{broker:<9} {serial:<7} {rate:>9.0f} {overlaps:>9} {most:>13} "
              f"{f'{in_order}/{args.endpoints}':>19} {samples:>8} "
              f"{worker_cpu:>18.0f} {redis_cpu:>17.0f}")  # fmt: skip
    if not ok:
        raise SystemExit("serial keys did not hold (see the table)")


if __name__ == "__main__":
    main()
