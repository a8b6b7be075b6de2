"""epq against plain Dramatiq, measured in one run on this machine, on stub, Redis and RabbitMQ.

    python benchmarks/compare.py                  # small defaults: well under two minutes
    python benchmarks/compare.py --n 20000 --drain 20000 --processes 2 --json results.json

For each broker, plain Dramatiq (one no-op actor) and epq (every epq middleware on: uniqueness,
records, priorities, durable schedule, River retries) are measured side by side:

- single enqueue: ``--n`` jobs sent one by one (epq: ``index_endpoint.send``, uniqueness on);
- bulk enqueue: ``--n`` jobs a round by epq's ``QueueService.enqueue_many``, in batches of
  ``--batch`` (requests made and validated inside the timed part). Dramatiq has no bulk send,
  so its baseline is its single send (the ratio is "bulk epq / single plain");
- both measured in ``--rounds`` alternating rounds (plain, epq, bulk, then the other way
  round), the median round of each, so that the machine's drift falls on all of them alike;
  payload values (endpoint ids) are made before the clock starts;
- drain: a backlog of ``--drain`` no-op jobs, then ``--processes`` worker processes of
  ``--threads`` threads (the stub broker: one in-process worker); jobs per second from the first
  start to the last;
- latency: ``--latency-jobs`` jobs sent ``--latency-gap-ms`` apart to idle workers; p50/p99 of
  the time from send to start;
- worker RSS: one worker process idle, then with ``--scheduled`` jobs scheduled an hour ahead
  (plain Dramatiq: its delay queue; epq: its durable schedule);
- Redis memory per waiting and per completed job (``benchmarks/memory.py``, ``--memory-n`` jobs a
  side, databases 11 and 12).

``--metrics`` runs epq with its Prometheus metrics on (``EPQ_METRICS=1``; worker processes serve
``/metrics`` on ``--metrics-port``); ``--metrics-ab ROUNDS`` measures instead what they cost: epq's
single enqueue and drain with them off and on, in alternating rounds, and prints for each the
rate and the CPU time per job (the enqueue's process, the drain's workers) and the median of each
round's on/off with a 95 % bootstrap interval; then, with ``py-spy`` on the PATH, one more drain
of ``--share-drain`` jobs with metrics on, sampled: the share of the workers' CPU spent in the metrics code;
``--tracing`` runs epq with its OpenTelemetry spans on (no SDK configured: the API's no-op
tracer); without them both are off (``EPQ_TRACING=0``).

Every job does the same small thing in both apps: one Redis script call noting it
(``benchmarks/_report.py``), which is how the run sees jobs start and finish.

Uses Redis databases 8 (results), 9 (plain Dramatiq), 10 (epq), 11 and 12 (memory), flushed; on RabbitMQ the
queues ``bench-plain*`` and epq's queues, purged. Prints a table with epq/plain ratios and writes
JSON (``--json``, default ``benchmarks/results/compare-latest.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

import epq  # noqa: E402
from benchmarks import _report, memory  # noqa: E402
from benchmarks._proc import cpu_seconds, rss_mib  # noqa: E402
from epq import _runtime, handlers, metrics  # noqa: E402
from epq.settings import reset_settings  # noqa: E402

PLAIN_QUEUE = "bench-plain"


# ---- helpers ---------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Results:
    """The results Redis: what the jobs noted."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def reset(self, target: int) -> None:
        self.client.delete(*_report.KEYS)
        os.environ["BENCH_TARGET"] = str(target)

    def count(self) -> int:
        return int(self.client.get("bench:count") or 0)

    def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {self.count()} of {n} jobs ran in {timeout:.0f} s")
            time.sleep(0.02)

    def drain_rate(self, n: int) -> float:
        first, last = float(self.client.get("bench:first") or 0), float(self.client.get("bench:last") or 0)
        return n / (last - first) if last > first else float("nan")

    def latencies(self) -> list[float]:
        return [float(v) for v in self.client.lrange("bench:latency", 0, -1)]


class App:
    """One side of the comparison on one broker: how to send, how to run workers."""

    def __init__(self, kind: str, broker_name: str, urls: dict[str, str]) -> None:
        self.kind, self.broker_name, self.urls = kind, broker_name, urls
        self.broker: Any = None
        self.actor: Any = None

    # setup and teardown

    def open(self) -> None:
        if self.kind == "plain":
            if self.broker_name == "stub":
                self.broker = StubBroker()
            elif self.broker_name == "redis":
                self.broker = RedisBroker(url=self.urls["plain_redis"], namespace="benchplain")
            else:
                self.broker = RabbitmqBroker(url=self.urls["rabbitmq"], confirm_delivery=True)
            self.actor = dramatiq.Actor(
                _plain_job, broker=self.broker, actor_name="plain_job", queue_name=PLAIN_QUEUE,
                priority=0, options={"max_retries": 0},
            )  # fmt: skip
        else:
            url = {"stub": "stub://", "redis": self.urls["epq_redis"], "rabbitmq": self.urls["rabbitmq"]}
            state = self.urls["epq_redis"] if self.broker_name == "rabbitmq" else None
            self.broker = _runtime.install(url[self.broker_name], state_url=state).broker
        self.flush()

    def flush(self) -> None:
        if self.broker_name == "rabbitmq":
            for q in list(self.broker.get_declared_queues()):
                self.broker.declare_queue(q, ensure=True)
        self.broker.flush_all()
        if self.broker_name != "stub":
            db = self.urls["plain_redis" if self.kind == "plain" else "epq_redis"]
            redis.Redis.from_url(db).flushdb()

    def close(self) -> None:
        self.flush()
        if self.kind == "epq":
            _runtime.reset()
        else:
            self.broker.close()

    # sending

    def send(self, i: int, sent_at: float | None = None, endpoint_id: uuid.UUID | None = None) -> None:
        if self.kind == "plain":
            self.actor.send(i, sent_at) if sent_at is not None else self.actor.send(i)
            return
        from epq import actors  # after _runtime.install: importing it earlier would set epq up

        if sent_at is None:
            actors.index_endpoint.send(endpoint_id=str(endpoint_id or uuid.uuid4()), source="API")
        else:
            actors.register_job.send(
                endpoint_id=str(uuid.uuid4()), job_id=f"lat-{i}", job_metadata={"sent_at": sent_at}
            )

    def send_bulk(self, ids: list[uuid.UUID], batch: int) -> None:
        """Enqueue one index job per endpoint id, ``batch`` requests per ``enqueue_many`` call (the
        requests are made inside the timed part: validating them is epq's work)."""
        svc = epq.QueueService(self.broker)
        for start in range(0, len(ids), batch):
            svc.enqueue_many(
                [
                    epq.EnqueueIndexEndpointRequest(endpoint_id=i, source="API")
                    for i in ids[start : start + batch]
                ]
            )

    def schedule(self, n: int) -> None:
        if self.kind == "plain":
            for i in range(n):
                self.actor.send_with_options(args=(i,), delay=3_600_000)
            return
        later = datetime.now(timezone.utc) + timedelta(hours=1)
        svc = epq.QueueService(self.broker)
        for start in range(0, n, 500):
            svc.enqueue_many(
                [
                    epq.EnqueueIndexEndpointRequest(endpoint_id=uuid.uuid4(), source="API", run_at=later)
                    for _ in range(min(500, n - start))
                ]
            )

    # workers

    def start_workers(self, processes: int, threads: int) -> Any:
        if self.broker_name == "stub":
            worker = dramatiq.Worker(self.broker, worker_threads=threads, worker_timeout=50)
            worker.start()
            return worker
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # BENCH_RESULTS_URL: set by main()
        if self.kind == "plain":
            env["BENCH_BROKER_URL"] = (
                self.urls["plain_redis"] if self.broker_name == "redis" else self.urls["rabbitmq"]
            )
            module = "benchmarks.plain_app"
        else:
            env["EPQ_HANDLERS"] = "benchmarks.epq_handlers"
            if os.environ.get("BENCH_METRICS_PORT"):  # --metrics: the worker serves /metrics
                env["EPQ_METRICS_PORT"] = os.environ["BENCH_METRICS_PORT"]
            if self.broker_name == "redis":
                env["EPQ_BROKER_URL"] = self.urls["epq_redis"]
            else:
                env["EPQ_BROKER_URL"], env["EPQ_STATE_URL"] = self.urls["rabbitmq"], self.urls["epq_redis"]
            module = "epq.actors"
        cmd = [str(BIN / "dramatiq"), module, "--processes", str(processes), "--threads", str(threads)]
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_booted(self, workers: Any, processes: int, results: Results) -> None:
        """Until every worker process serves (a probe job per process ran)."""
        if self.broker_name == "stub":
            return
        time.sleep(1.0)
        before = results.count()
        for i in range(processes * 4):
            self.send(10_000_000 + i)
        results.wait(before + processes * 4, timeout=60)

    def stop_workers(self, workers: Any) -> None:
        if self.broker_name == "stub":
            workers.stop()
            return
        os.killpg(workers.pid, signal.SIGTERM)
        try:
            workers.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(workers.pid, signal.SIGKILL)
            workers.wait()


def _plain_job(n: int, sent_at: float | None = None) -> None:
    _report.report(sent_at)


def _epq_stub_handlers() -> None:
    handlers.register("index_endpoint", lambda request: _report.report(None))
    handlers.register(
        "register_job",
        lambda request: _report.report(
            float(request.job_metadata["sent_at"]) if "sent_at" in request.job_metadata else None
        ),
    )


# ---- measurements ----------------------------------------------------------------------------


def drain(app: App, results: Results, n: int, processes: int, threads: int, batch: int) -> tuple[Any, float]:
    """A backlog of ``n`` jobs (epq: sent in bulk), then the workers: (the workers, still running,
    and the jobs per second from the first start to the last)."""
    results.reset(n)
    if app.kind == "epq":
        app.send_bulk([uuid.uuid4() for _ in range(n)], batch)
    else:
        for i in range(n):
            app.send(i)
    workers = app.start_workers(processes, threads)
    try:
        results.wait(n, timeout=300)
    except BaseException:
        app.stop_workers(workers)
        raise
    return workers, results.drain_rate(n)


def measure(app: App, args: argparse.Namespace, results: Results) -> dict[str, float]:
    out: dict[str, float] = {}
    app.open()
    try:
        workers, rate = drain(app, results, args.drain, args.processes, args.threads, args.batch)
        out["drain_per_s"] = rate
        try:
            # latency, on the same (now idle) workers
            time.sleep(0.5)
            results.reset(10**9)
            for i in range(args.latency_jobs):
                app.send(i, sent_at=time.time())
                time.sleep(args.latency_gap_ms / 1000)
            results.wait(args.latency_jobs, timeout=60)
            waits = results.latencies()
            out["latency_p50_ms"], out["latency_p99_ms"] = _pct(waits, 0.5), _pct(waits, 0.99)
        finally:
            app.stop_workers(workers)
        app.flush()
        # worker RSS: idle, then with many jobs scheduled an hour ahead
        if app.broker_name != "stub" and args.scheduled:
            results.reset(10**9)
            workers = app.start_workers(1, args.threads)
            try:
                app.wait_booted(workers, 1, results)
                time.sleep(1.0)
                out["rss_idle_mib"] = rss_mib(workers.pid)
                app.schedule(args.scheduled)
                time.sleep(args.settle_s)
                out["rss_scheduled_mib"] = rss_mib(workers.pid)
                out["rss_growth_pct"] = 100 * (out["rss_scheduled_mib"] / out["rss_idle_mib"] - 1)
            finally:
                app.stop_workers(workers)
    finally:
        app.close()
    return out


def enqueue_rates(plain: App, ours: App, args: argparse.Namespace) -> dict[str, float]:
    """Single-send rates of both apps and epq's bulk rate, in alternating rounds (so that the
    machine's ups and downs fall on all alike); the median round of each."""
    plain.open()
    ours.open()
    try:
        rates: dict[str, list[float]] = {"plain": [], "epq": [], "bulk": []}
        per_round = max(1, args.n // args.rounds)
        # payload values are made before the clock starts (plain Dramatiq's are plain ints)
        ids = [uuid.uuid4() for _ in range(per_round * args.rounds + args.n * args.rounds)]
        bulk_ids = ids[per_round * args.rounds :]
        plain.send(-1)
        ours.send(-1)
        for r in range(args.rounds):
            for side in ("plain", "epq", "bulk") if r % 2 == 0 else ("bulk", "epq", "plain"):
                start = time.perf_counter()
                if side == "bulk":
                    ours.send_bulk(bulk_ids[r * args.n : (r + 1) * args.n], args.batch)
                    rates[side].append(args.n / (time.perf_counter() - start))
                    continue
                app = plain if side == "plain" else ours
                for i in range(r * per_round, (r + 1) * per_round):
                    app.send(i, endpoint_id=ids[i])
                rates[side].append(per_round / (time.perf_counter() - start))
        return {side: statistics.median(values) for side, values in rates.items()}
    finally:
        ours.close()
        plain.close()


def _metrics_mode(on: bool, port: int) -> None:
    """Turn epq's metrics on or off for what comes next: this process's (enqueue, the stub's
    worker) at once, worker processes' when they start (``EPQ_METRICS``, ``EPQ_METRICS_PORT``)."""
    os.environ["EPQ_METRICS"] = "1" if on else "0"
    reset_settings()  # (epq reads its settings once)
    if on:
        os.environ["BENCH_METRICS_PORT"] = str(port)
        metrics.enable()
    else:
        os.environ.pop("BENCH_METRICS_PORT", None)
        metrics.disable()


def metrics_ab(
    broker: str, urls: dict[str, str], args: argparse.Namespace, results: Results
) -> dict[str, Any]:
    """epq's single enqueue (``--n`` jobs) and drain (``--drain`` jobs) with its metrics off and
    on, in ``--metrics-ab`` alternating rounds (off then on, then on then off, ...), so that the
    machine's drift falls on both alike. Each round gives a rate and a CPU time per job: for the
    enqueue, this process's; for the drain, the worker processes' (the stub's in-process worker:
    this process's), from the first start to the last."""
    app = App("epq", broker, urls)
    measures = ("enqueue", "drain", "enqueue_cpu_us", "drain_cpu_us")
    rounds: dict[str, dict[str, list[float]]] = {m: {"off": [], "on": []} for m in measures}
    for r in range(args.metrics_ab):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            _metrics_mode(mode == "on", args.metrics_port)  # (before epq is set up: it reads EPQ_METRICS)
            app.open()
            try:
                ids = [uuid.uuid4() for _ in range(args.n)]
                app.send(-1)
                start, cpu = time.perf_counter(), time.process_time()
                for i, endpoint in enumerate(ids):
                    app.send(i, endpoint_id=endpoint)
                rounds["enqueue"][mode].append(args.n / (time.perf_counter() - start))
                rounds["enqueue_cpu_us"][mode].append((time.process_time() - cpu) / args.n * 1e6)
                app.flush()
                rate, cpu_us = _drain_with_cpu(app, results, args)
                rounds["drain"][mode].append(rate)
                rounds["drain_cpu_us"][mode].append(cpu_us)
            finally:
                app.close()
    return {measure: _ab_summary(by_mode) for measure, by_mode in rounds.items()}


def _drain_with_cpu(app: App, results: Results, args: argparse.Namespace) -> tuple[float, float]:
    """:func:`drain`, and the workers' CPU microseconds per job from the first start to the end."""
    n = args.drain
    results.reset(n)
    app.send_bulk([uuid.uuid4() for _ in range(n)], args.batch)
    cpu_now = time.process_time if app.broker_name == "stub" else None
    workers = app.start_workers(args.processes, args.threads)
    try:
        while results.count() == 0:  # (the workers boot: not part of the cost per job)
            time.sleep(0.002)
        first, cpu = results.count(), cpu_now() if cpu_now else cpu_seconds(workers.pid)
        results.wait(n, timeout=300)
        used = (cpu_now() if cpu_now else cpu_seconds(workers.pid)) - cpu
    finally:
        app.stop_workers(workers)
    return results.drain_rate(n), used / max(1, n - first) * 1e6


def _ab_summary(by_mode: dict[str, list[float]]) -> dict[str, Any]:
    """The medians of the off and on rounds, and the on/off ratio of each round with the one run
    beside it: their median and a 95 % interval of that median (bootstrap, fixed seed)."""
    ratios = [on / off for off, on in zip(by_mode["off"], by_mode["on"], strict=True)]
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return {
        "off": statistics.median(by_mode["off"]),
        "on": statistics.median(by_mode["on"]),
        "paired": statistics.median(ratios),
        "low": medians[50],
        "high": medians[1949],
        "rounds": by_mode,
    }


METRICS_CODE = ("epq/metrics.py", "epq/middleware/metrics.py", "prometheus_client/")


def metrics_share(
    broker: str, urls: dict[str, str], args: argparse.Namespace, results: Results
) -> float | None:
    """One drain of ``--share-drain`` jobs with metrics on, its worker processes (the stub's: this
    process) sampled by ``py-spy`` from the first start to the last: the share of their on-CPU
    samples whose stack is in epq's metrics code or ``prometheus_client``. None without py-spy."""
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    app = App("epq", broker, urls)
    _metrics_mode(True, args.metrics_port)
    app.open()
    out = Path(tempfile.mkstemp(prefix="epq-spy-", suffix=".txt")[1])
    try:
        results.reset(args.share_drain)
        app.send_bulk([uuid.uuid4() for _ in range(args.share_drain)], args.batch)
        workers = app.start_workers(args.processes, args.threads)
        try:
            while results.count() == 0:
                time.sleep(0.002)
            pid = os.getpid() if broker == "stub" else workers.pid
            sampler = subprocess.Popen(
                [spy, "record", "--nonblocking", "--subprocesses", "--rate", "200", "--format", "raw",
                 "--output", str(out), "--pid", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            results.wait(args.share_drain, timeout=600)
            sampler.send_signal(signal.SIGINT)
            sampler.wait(timeout=60)
        finally:
            app.stop_workers(workers)
        total = in_metrics = 0
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            total += int(count)
            if any(code in stack for code in METRICS_CODE):
                in_metrics += int(count)
        return in_metrics / total if total else None
    finally:
        out.unlink(missing_ok=True)
        app.close()
        _metrics_mode(False, args.metrics_port)


def ab_table(all_ab: dict[str, dict[str, Any]]) -> str:
    head = f"{'broker':<10}{'measure':<26}{'metrics off':>12}{'metrics on':>12}{'on/off':>8}"
    head += f"{'95 % interval':>16}"
    lines = [head, "-" * len(head)]
    names = {
        "enqueue": "enqueue (jobs/s)",
        "drain": "drain (jobs/s)",
        "enqueue_cpu_us": "enqueue CPU (us/job)",
        "drain_cpu_us": "drain CPU (us/job)",
    }
    for broker, measures in all_ab.items():
        for measure, values in measures.items():
            if measure == "worker_cpu_in_metrics":
                lines.append(f"{broker:<10}{'worker CPU in metrics':<26}{values:>32.2%}   (py-spy samples)")
                continue
            interval = f"{values['low']:.3f}-{values['high']:.3f}"
            lines.append(
                f"{broker:<10}{names[measure]:<26}{values['off']:>12.1f}{values['on']:>12.1f}"
                f"{values['paired']:>8.3f}{interval:>16}"
            )
            for mode in ("off", "on"):
                rounds = " ".join(f"{v:.0f}" for v in values["rounds"][mode])
                lines.append(f"{'':<10}{'  ' + mode + ' rounds:':<26}{rounds}")
    lines.append(
        "on/off: the median of each round's on/off ratio (off and on run side by side in a round); "
        "CPU: this process's for an enqueue, the workers' for a drain;\nworker CPU in metrics: the share "
        "of a metrics-on drain's worker samples (py-spy, when on PATH) in epq's metrics code or "
        "prometheus_client"
    )
    return "\n".join(lines)


ROWS = [
    ("single_enqueue_per_s", "single enqueue (jobs/s)", "single_enqueue_per_s"),
    ("bulk_enqueue_per_s", "bulk enqueue (jobs/s; plain: single)", "single_enqueue_per_s"),
    ("drain_per_s", "drain (jobs/s)", "drain_per_s"),
    ("latency_p50_ms", "send-to-start p50 (ms)", "latency_p50_ms"),
    ("latency_p99_ms", "send-to-start p99 (ms)", "latency_p99_ms"),
    ("rss_idle_mib", "worker RSS idle (MiB)", "rss_idle_mib"),
    ("rss_scheduled_mib", "worker RSS, jobs scheduled (MiB)", "rss_scheduled_mib"),
    ("rss_growth_pct", "RSS growth with them (%)", "rss_growth_pct"),
    ("memory_waiting_b", "Redis memory per waiting job (bytes)", "memory_waiting_b"),
    ("memory_completed_b", "Redis memory per completed job (bytes)", "memory_completed_b"),
]


def table(all_results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'broker':<10}{'measure':<38}{'plain':>12}{'epq':>12}{'epq/plain':>11}"]
    lines.append("-" * len(lines[0]))
    for broker, sides in all_results.items():
        for key, label, plain_key in ROWS:
            if key not in sides["epq"]:
                continue
            plain, ours = sides["plain"].get(plain_key, float("nan")), sides["epq"][key]
            # (no ratio to a baseline of about nothing: plain Dramatiq keeps no completed job)
            nothing = key == "memory_completed_b" or not plain or plain != plain
            shown = f"{'-':>11}" if nothing else f"{ours / plain:>10.2f}x"
            lines.append(f"{broker:<10}{label:<38}{plain:>12.1f}{ours:>12.1f}{shown}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="stub,redis,rabbitmq")
    parser.add_argument(
        "--metrics", action="store_true",
        help="epq with its Prometheus metrics on (EPQ_METRICS=1; workers serve them: EPQ_METRICS_PORT)",
    )  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=9811, help="the workers' /metrics with --metrics")
    parser.add_argument(
        "--metrics-ab", type=int, default=0, metavar="ROUNDS",
        help="instead of the comparison with plain Dramatiq: epq's enqueue and drain with its metrics "
        "off and on, in ROUNDS alternating rounds (medians and on/off)",
    )  # fmt: skip
    parser.add_argument(
        "--share-drain", type=int, default=20000, metavar="N",
        help="with --metrics-ab and py-spy on the PATH: the jobs of the sampled metrics-on drain",
    )  # fmt: skip
    parser.add_argument(
        "--tracing", action="store_true",
        help="epq with its OpenTelemetry spans on (EPQ_TRACING=1; no SDK: the API's no-op tracer)",
    )  # fmt: skip
    parser.add_argument("--n", type=int, default=3000, help="jobs per enqueue measurement")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds of the enqueue measures")
    parser.add_argument("--batch", type=int, default=500, help="requests per enqueue_many call")
    parser.add_argument("--drain", type=int, default=2000, help="backlog the workers drain")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--latency-gap-ms", type=float, default=5.0)
    parser.add_argument("--scheduled", type=int, default=10_000, help="jobs scheduled for the RSS measure")
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument(
        "--memory-n", type=int, default=5000, help="jobs a side for Redis memory per job (0: skip)"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (databases 8-10)")
    parser.add_argument("--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "compare-latest.json"))
    args = parser.parse_args()
    # (read by epq when it is set up, below: this process enqueues, and runs the stub's worker)
    os.environ["EPQ_TRACING"] = "1" if args.tracing else "0"
    if args.metrics:
        os.environ["EPQ_METRICS"] = "1"
        os.environ["BENCH_METRICS_PORT"] = str(args.metrics_port)

    base = args.redis.rstrip("/")
    urls = {"plain_redis": f"{base}/9", "epq_redis": f"{base}/10", "rabbitmq": args.rabbitmq}
    os.environ["BENCH_RESULTS_URL"] = f"{base}/8"  # where the jobs note themselves (_report)
    results = Results(os.environ["BENCH_RESULTS_URL"])
    _epq_stub_handlers()
    started = time.monotonic()
    if args.metrics_ab:
        all_ab = {}
        for broker in args.brokers.split(","):
            print(f"measuring epq with metrics off and on, on {broker} ...", file=sys.stderr, flush=True)
            all_ab[broker] = metrics_ab(broker, urls, args, results)
            share = metrics_share(broker, urls, args, results)
            if share is not None:
                all_ab[broker]["worker_cpu_in_metrics"] = share
        print(ab_table(all_ab))
        if args.json:
            Path(args.json).write_text(json.dumps({"metrics_ab": all_ab, "argv": sys.argv[1:]}, indent=2))
        print(f"\n{args.metrics_ab} rounds; {args.n} jobs enqueued and {args.drain} drained a round; "
              f"{args.processes} worker process(es) x {args.threads} threads; "
              f"{time.monotonic() - started:.0f} s in all")  # fmt: skip
        return
    all_results: dict[str, dict[str, dict[str, float]]] = {}
    for broker in args.brokers.split(","):
        all_results[broker] = {}
        print(f"measuring single enqueue on {broker} ...", file=sys.stderr, flush=True)
        rates = enqueue_rates(App("plain", broker, urls), App("epq", broker, urls), args)
        for kind in ("plain", "epq"):
            print(f"measuring {kind} on {broker} ...", file=sys.stderr, flush=True)
            all_results[broker][kind] = measure(App(kind, broker, urls), args, results)
        all_results[broker]["plain"]["single_enqueue_per_s"] = rates["plain"]
        all_results[broker]["epq"]["single_enqueue_per_s"] = rates["epq"]
        all_results[broker]["epq"]["bulk_enqueue_per_s"] = rates["bulk"]
        if broker == "redis" and args.memory_n:
            print("measuring Redis memory per job ...", file=sys.stderr, flush=True)
            plain_memory = memory.measure_plain(f"{base}/{memory.PLAIN_DB}", args.memory_n)
            epq_memory = memory.measure_epq(f"{base}/{memory.EPQ_DB}", args.memory_n)
            for kind, (waiting, completed) in (("plain", plain_memory), ("epq", epq_memory)):
                all_results[broker][kind]["memory_waiting_b"] = waiting
                all_results[broker][kind]["memory_completed_b"] = completed
    elapsed = time.monotonic() - started
    print(table(all_results))
    print(f"\n{args.processes} worker process(es) x {args.threads} threads; {elapsed:.0f} s in all")
    out = {
        "when": datetime.now(timezone.utc).isoformat(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "node": platform.node()},
        "args": vars(args),
        "results": all_results,
        "ratios": {
            broker: {
                key: sides["epq"][key] / sides["plain"][plain_key]
                for key, _, plain_key in ROWS
                if key in sides["epq"] and sides["plain"].get(plain_key)
            }
            for broker, sides in all_results.items()
        },
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
