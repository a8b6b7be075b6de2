"""Cost per job on each broker, and throughput with more worker processes: epq against plain
Dramatiq, measured in one run on this machine.

    python benchmarks/cost.py --redis redis://127.0.0.1:6501 --results redis://127.0.0.1:6502/8 \\
        --rabbitmq amqp://guest:guest@127.0.0.1:5801/%2F --rabbitmq-dir /tmp/h-scale/rabbitmq-5801

Cost per job (``--n`` jobs a side; ``docs/scaling.md`` reads the numbers):

- enq: ``--n`` jobs sent one by one, no worker running;
- run: one worker process of ``--threads`` threads then drains that backlog, and the counters are
  read at 10 % and 90 % of it (no boot, no sending in the window), each group of counters divided
  by the jobs that ran between its two readings;
- idle: the same worker for ``--idle-s`` seconds with nothing to do, per second.

What is counted:

- requests to Redis: commands the clients sent (a Lua script call is one; a pipeline of k commands
  is k), counted with MONITOR in a pass of its own (``--monitor-n`` jobs), since MONITOR costs
  the server time and bytes;
- commands Redis ran: ``INFO commandstats`` calls, including those run inside scripts;
- bytes to and from Redis: ``INFO stats`` total_net_input_bytes / total_net_output_bytes;
- Redis CPU: ``INFO cpu`` used_cpu_user_main_thread + used_cpu_sys_main_thread (the one thread
  that runs every command);
- CPU in the sending process (``time.process_time``) and in the worker processes (/proc, the
  worker's process tree; on the stub broker the worker runs in the sending process);
- on RabbitMQ: bytes on the AMQP connections and the node's CPU, when ``--rabbitmq-dir`` names the
  data dir of a node started by ``brokers/rabbitmq-start`` (read with its ``rabbitmqctl``; RabbitMQ
  without its management plugin counts no publishes or acks); epq's state Redis is ``--redis``.

Throughput: a backlog of ``--drain`` jobs drained by 1, 2 and 4 worker processes (``--processes``),
jobs per second from the first start to the last (``benchmarks/compare.py``'s drain).

The counters of ``--redis`` and of the RabbitMQ node are server-wide: give the script servers of
its own (``brokers/redis-start``, ``brokers/rabbitmq-start``), and put ``--results`` (where the jobs
note themselves, ``benchmarks/_report.py``) on another Redis server. Uses databases 9 (plain) and
10 (epq) of ``--redis``, flushed; purges the RabbitMQ queues it uses. Every job does one small
script call to ``--results`` in both apps, so the worker CPU includes that call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._proc import cpu_seconds  # noqa: E402
from benchmarks.compare import App, Results, _epq_stub_handlers, drain  # noqa: E402

SCRIPT_CALLS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro", "cmdstat_eval_ro", "cmdstat_fcall")
RABBITMQCTL = Path(os.environ.get("EPQ_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin")) / "rabbitmqctl"


# ---- counters --------------------------------------------------------------------------------


class Counters:
    """What a run reads before and after a measured step: Redis's counters, the RabbitMQ node's
    (when it can), the CPU of this process and of the worker processes; with each group, how many
    jobs had run when it was read (``<group>_jobs``), so that a drain's counters are shared by the
    jobs that ran between two readings of that group."""

    def __init__(
        self, redis_url: str | None, rabbitmq_url: str, rabbitmq_dir: str | None, jobs: Callable[[], int]
    ) -> None:
        self.redis = redis.Redis.from_url(redis_url) if redis_url else None
        self.rabbitmq_dir = rabbitmq_dir
        self.node = f"epq-{urlsplit(rabbitmq_url).port}@localhost"
        self.jobs = jobs
        self.workers_pid: int | None = None
        base = self.read()
        self.overhead = _minus(self.read(), base)  # what reading costs (INFO's own bytes)

    def read(self, *, slow: bool = True) -> dict[str, float]:
        """The counters; ``slow=False``: not the RabbitMQ node's (rabbitmqctl takes half a second)."""
        out: dict[str, float] = {"here_cpu": time.process_time(), "here_jobs": self.jobs()}
        if self.redis is not None:
            out.update(self._redis(self.redis), redis_jobs=self.jobs())
        if self.workers_pid is not None:
            out.update(workers_cpu=cpu_seconds(self.workers_pid), workers_jobs=self.jobs())
        if self.rabbitmq_dir and slow:  # (rabbitmqctl reads at the end of its half second)
            out.update(self._rabbitmq(), rabbitmq_jobs=self.jobs())
        return out

    @staticmethod
    def _redis(client: redis.Redis) -> dict[str, float]:
        stats, cpu, calls = client.info("stats"), client.info("cpu"), client.info("commandstats")
        return {
            "redis_commands": sum(v["calls"] for k, v in calls.items() if k != "cmdstat_info"),
            "redis_scripts": sum(calls.get(k, {}).get("calls", 0) for k in SCRIPT_CALLS),
            "redis_in": stats["total_net_input_bytes"],
            "redis_out": stats["total_net_output_bytes"],
            "redis_cpu": cpu["used_cpu_user_main_thread"] + cpu["used_cpu_sys_main_thread"],
        }

    def _rabbitmq(self) -> dict[str, float]:
        run = subprocess.run(
            [str(RABBITMQCTL), "-n", self.node, "-q", "list_connections", "recv_oct", "send_oct"],
            env={**os.environ, "HOME": str(self.rabbitmq_dir)}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows = [line.split() for line in run.stdout.splitlines() if line.split()[:1] and line[0].isdigit()]
        pid = int((Path(str(self.rabbitmq_dir)) / "rabbitmq.pid").read_text())
        return {
            "rabbitmq_in": sum(int(r[0]) for r in rows),
            "rabbitmq_out": sum(int(r[1]) for r in rows),
            "rabbitmq_cpu": cpu_seconds(pid),
        }

    def change(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Per job (the jobs of each group), less what reading costs. ``*_jobs``: jobs that ran."""
        moved = _minus(after, before)
        return {
            k: (v - self.overhead[k] if k.startswith("redis_") else v)
            / max(1, moved[k.split("_")[0] + "_jobs"])
            for k, v in moved.items()
            if not k.endswith("_jobs")
        }


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k in before}


def reach(results: Results, count: float) -> None:
    """Until ``count`` jobs have run."""
    deadline = time.monotonic() + 300
    while results.count() < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {results.count()} of {count:.0f} jobs ran in 300 s")
        time.sleep(0.002)


class Monitor:
    """Commands clients send to Redis (not those run inside scripts), seen through MONITOR, by
    the time Redis got them."""

    def __init__(self, redis_url: str) -> None:
        self.url, self.seen = redis_url, list[float]()
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with redis.Redis.from_url(self.url).monitor() as monitor:
            self.ready.set()
            while not self.stop.is_set():
                event = monitor.next_command()
                if event["client_type"] != "lua":
                    self.seen.append(float(event["time"]))

    def __enter__(self) -> Monitor:
        self.thread.start()
        self.ready.wait(5)
        time.sleep(0.1)  # (MONITOR on its way)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        redis.Redis.from_url(self.url).ping()  # wakes the watcher
        self.thread.join(5)

    def count(self, start: float, end: float) -> int:
        return sum(1 for t in self.seen if start <= t <= end)


# ---- one side on one broker ------------------------------------------------------------------


def cost(app: App, args: argparse.Namespace, results: Results, counters: Counters) -> dict[str, float]:
    """Per job: enqueue (``enq_*``: ``--n`` single sends, no worker running) and a worker's run
    (``run_*``: the middle of the drain of that backlog, 10% to 90% of it), and idle (``idle_*``,
    per second). Requests come from a backlog of its own before (``--monitor-n``, watched)."""
    uses_redis = counters.redis is not None
    watched, n = (args.monitor_n if uses_redis else 0), args.n

    def send(count: int) -> Callable[[], None]:
        ids = [uuid.uuid4() for _ in range(count)]  # (made before the step is measured; each unique)

        def step() -> None:
            for i in range(count):
                app.send(i, endpoint_id=ids[i])

        return step

    out: dict[str, float] = {}
    app.open()
    try:
        app.send(-1)  # warm up: connections, scripts
        app.flush()
        results.reset(watched + n)
        if watched:
            sending = send(watched)
            with Monitor(args.redis) as monitor:
                start = time.time()
                sending()
                end = time.time()
            out["enq_requests"] = monitor.count(start, end) / watched
        sending = send(n)
        before = counters.read()
        sending()
        enqueue = counters.change(before, counters.read())  # (no job ran: the totals)
        out.update({f"enq_{k}": v / n for k, v in enqueue.items()})
        whole = counters.read()
        workers = app.start_workers(1, args.threads)
        try:
            if watched:
                with Monitor(args.redis) as monitor:
                    reach(results, 0.1 * watched)
                    start, done = time.time(), results.count()
                    reach(results, 0.9 * watched)
                    end, done = time.time(), results.count() - done
                out["run_requests"] = monitor.count(start, end) / done
            if app.broker_name != "stub":
                counters.workers_pid = workers.pid
            reach(results, watched + 0.1 * n)
            before = counters.read(slow=False)
            reach(results, watched + 0.9 * n)
            run = counters.change(before, counters.read(slow=False))
            if app.broker_name == "stub":  # the worker runs in this process
                run["workers_cpu"] = run["here_cpu"]
            del run["here_cpu"]
            out.update({f"run_{k}": v for k, v in run.items()})
            reach(results, watched + n)
            # RabbitMQ's counters: over the whole drain (with the workers' boot: a few kB)
            drained = counters.change(whole, counters.read())
            out.update({f"run_{k}": v for k, v in drained.items() if k.startswith("rabbitmq_")})
            if app.broker_name != "stub":
                time.sleep(1.0)
                before = counters.read(slow=False)
                time.sleep(args.idle_s)
                idle = counters.change(before, counters.read(slow=False))  # (no job ran: the totals)
                out["idle_workers_cpu"] = idle["workers_cpu"] / args.idle_s
                if uses_redis:
                    out["idle_scripts"] = idle["redis_scripts"] / args.idle_s
                    out["idle_commands"] = idle["redis_commands"] / args.idle_s
        finally:
            counters.workers_pid = None
            app.stop_workers(workers)
    finally:
        app.close()
    return out


ROWS = [  # key, label, scale (per job -> shown unit)
    ("requests", "requests to Redis / job", 1),
    ("redis_commands", "commands Redis ran / job", 1),
    ("redis_in", "bytes to Redis / job", 1),
    ("redis_out", "bytes from Redis / job", 1),
    ("redis_cpu", "Redis CPU (us / job)", 1e6),
    ("rabbitmq_in", "AMQP bytes to RabbitMQ / job", 1),
    ("rabbitmq_out", "AMQP bytes from RabbitMQ / job", 1),
    ("rabbitmq_cpu", "RabbitMQ CPU (us / job)", 1e6),
    ("here_cpu", "CPU in the sender (us / job)", 1e6),
    ("workers_cpu", "CPU in the worker (us / job)", 1e6),
]


def cost_table(found: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'broker':<10}{'step':<8}{'measure':<34}{'plain':>10}{'epq':>10}{'epq/plain':>11}"]
    lines.append("-" * len(lines[0]))
    for broker, sides in found.items():
        rows = [
            (f"{step}_{key}", step, label, scale) for step in ("enq", "run") for key, label, scale in ROWS
        ]
        rows += [
            ("idle_scripts", "idle", "script calls to Redis / s", 1),
            ("idle_commands", "idle", "commands Redis ran / s", 1),
            ("idle_workers_cpu", "idle", "CPU in the worker (ms / s)", 1e3),
        ]
        for key, step, label, scale in rows:
            if key not in sides["epq"] and key not in sides["plain"]:
                continue
            plain, ours = sides["plain"].get(key), sides["epq"].get(key)
            shown = [f"{v * scale:>10.1f}" if v is not None else f"{'-':>10}" for v in (plain, ours)]
            ratio = f"{ours / plain:>10.2f}x" if plain and ours is not None else f"{'-':>11}"
            lines.append(f"{broker:<10}{step:<8}{label:<34}{shown[0]}{shown[1]}{ratio}")
    return "\n".join(lines)


def throughput(args: argparse.Namespace, urls: dict[str, str], results: Results) -> str:
    lines = [
        f"{'broker':<10}{'processes':>10}{'plain/s':>10}{'epq/s':>10}{'epq/plain':>11}{'epq vs 1 proc':>15}"
    ]
    lines.append("-" * len(lines[0]))
    for broker in [b for b in args.brokers.split(",") if b != "stub"]:
        first = None
        for processes in (int(p) for p in args.processes.split(",")):
            print(f"draining on {broker} with {processes} process(es) ...", file=sys.stderr, flush=True)
            found: dict[str, list[float]] = {"plain": [], "epq": []}
            for r in range(args.drain_rounds):  # (alternating: the machine's drift falls on both)
                for kind in ("plain", "epq") if r % 2 == 0 else ("epq", "plain"):
                    app = App(kind, broker, urls)
                    app.open()
                    try:
                        workers, rate = drain(app, results, args.drain, processes, args.threads, args.batch)
                        found[kind].append(rate)
                        app.stop_workers(workers)
                    finally:
                        app.close()
            rates = {kind: statistics.median(values) for kind, values in found.items()}
            first = first or rates["epq"]
            lines.append(
                f"{broker:<10}{processes:>10}{rates['plain']:>10.0f}{rates['epq']:>10.0f}"
                f"{rates['epq'] / rates['plain']:>10.2f}x{rates['epq'] / first:>14.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="stub,redis,rabbitmq")
    parser.add_argument("--n", type=int, default=3000, help="jobs a side for the cost per job")
    parser.add_argument("--monitor-n", type=int, default=500, help="jobs a side for the MONITOR count")
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds of the idle measure")
    parser.add_argument("--drain", type=int, default=6000, help="backlog drained for the throughput")
    parser.add_argument("--drain-rounds", type=int, default=3, help="drains a side (median kept)")
    parser.add_argument("--processes", default="1,2,4", help="worker processes for the throughput")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=500, help="requests per enqueue_many (epq's backlog)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (databases 9, 10)")
    parser.add_argument(
        "--results", default="redis://127.0.0.1:6379/8", help="where the jobs note themselves"
    )
    parser.add_argument("--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--rabbitmq-dir", help="data dir of the RabbitMQ node (AMQP bytes, node CPU)")
    parser.add_argument("--no-throughput", action="store_true")
    args = parser.parse_args()

    base = args.redis.rstrip("/")
    urls = {"plain_redis": f"{base}/9", "epq_redis": f"{base}/10", "rabbitmq": args.rabbitmq}
    os.environ["BENCH_RESULTS_URL"] = args.results  # where the jobs note themselves (_report)
    results = Results(args.results)
    _epq_stub_handlers()
    started = time.monotonic()
    found: dict[str, dict[str, dict[str, float]]] = {}
    for broker in args.brokers.split(","):
        dir_ = args.rabbitmq_dir if broker == "rabbitmq" else None
        found[broker] = {}
        for kind in ("plain", "epq"):
            # Redis: the broker's, or epq's state Redis on RabbitMQ
            uses_redis = broker == "redis" or (broker == "rabbitmq" and kind == "epq")
            redis_url = urls["epq_redis"] if uses_redis else None
            counters = Counters(redis_url, args.rabbitmq, dir_, results.count)
            print(f"measuring the cost per job of {kind} on {broker} ...", file=sys.stderr, flush=True)
            found[broker][kind] = cost(App(kind, broker, urls), args, results, counters)
    print(cost_table(found))
    print(f"\n{args.n} jobs a side (requests: {args.monitor_n}, through MONITOR); run: 1 worker process "
          f"x {args.threads} threads; on rabbitmq the Redis rows are epq's state Redis")  # fmt: skip
    if not args.no_throughput:
        print()
        print(throughput(args, urls, results))
        print(
            f"\nmedian of {args.drain_rounds} drains a side; a backlog of {args.drain} no-op jobs, "
            f"{args.threads} threads a process, {os.cpu_count()} CPUs"
        )
    print(f"{time.monotonic() - started:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
