"""epq's footprint against plain Dramatiq: import time and an idle worker's memory.

    python benchmarks/footprint.py --redis redis://127.0.0.1:6379        # about 40 s

Three sides: plain Dramatiq; plain Dramatiq with pydantic (an application whose actors validate
their payloads with a pydantic model, as epq's do); epq.

- import time: wall time of ``import dramatiq``, ``import dramatiq, pydantic.main`` and
  ``import epq``, each in ``--n`` fresh interpreters (in turn, so that the machine's drift falls
  on all alike), median; and how many modules each loads. ``import epq`` loads the public names
  on first use; the row "import epq and build a request" adds ``epq.EnqueueIndexEndpointRequest(...)``;
- idle worker RSS: ``dramatiq benchmarks.plain_app``, ``dramatiq benchmarks.plain_pydantic_app``
  and ``dramatiq epq.actors`` (``EPQ_HANDLERS=benchmarks.epq_handlers``), each ``--processes 1
  --threads T`` on a ``RedisBroker`` (databases 11, 11 and 12 of ``--redis``); the RSS of the
  worker process (the dramatiq parent's child, from /proc) ``--settle-s`` after it logged that
  it is ready, median of ``--rss-runs`` boots, in turn.

The workers get no jobs and nothing is flushed: an idle worker only reads its queues and writes
its heartbeats (and epq's its scheduler lease).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from benchmarks._proc import rss_mib  # noqa: E402

_IMPORT = (
    "import sys, time; n = len(sys.modules); t = time.perf_counter(); import {statement}; "
    "print(time.perf_counter() - t, len(sys.modules) - n)"
)

_REQUEST = f"epq.EnqueueIndexEndpointRequest(endpoint_id='{uuid.UUID(int=1)}', source='API')"


def import_cost(statement: str) -> tuple[float, int]:
    """Seconds ``import <statement>`` takes in a fresh interpreter, and how many modules it loads."""
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT.format(statement=statement)],
        capture_output=True, text=True, check=True, cwd=ROOT, env=_clean_env(),
    )  # fmt: skip
    seconds, modules = run.stdout.split()
    return float(seconds), int(modules)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPQ_", "BENCH_"))}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


def idle_worker_rss(module: str, env: dict[str, str], threads: int, settle_s: float) -> float:
    """RSS (MiB) of the one worker process of ``dramatiq module``, ``settle_s`` after it is ready."""
    cmd = [str(BIN / "dramatiq"), module, "--processes", "1", "--threads", str(threads)]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    ready = threading.Event()
    log: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if "Worker process is ready for action" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(60):
            raise SystemExit(f"{' '.join(cmd)} did not boot:\n{''.join(log[-20:])}")
        time.sleep(settle_s)
        return rss_mib(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10, help="fresh interpreters per import measure")
    parser.add_argument("--rss-runs", type=int, default=3, help="worker boots per RSS measure")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (databases 11, 12)")
    parser.add_argument("--no-rss", action="store_true", help="import time only (no Redis needed)")
    args = parser.parse_args()

    sides = ("dramatiq", "dramatiq+pydantic", "epq")
    imports = {
        "dramatiq": "dramatiq",
        "dramatiq+pydantic": "dramatiq, pydantic.main",
        "epq": "epq",
        "epq+request": f"epq; {_REQUEST}",
    }
    costs: dict[str, list[tuple[float, int]]] = {name: [] for name in imports}
    for _ in range(args.n):
        for name, statement in imports.items():
            costs[name].append(import_cost(statement))

    def ms(name: str) -> float:
        return 1000 * statistics.median(s for s, _ in costs[name])

    rows: list[tuple[str, list[float]]] = [
        ("import time (ms, median)", [ms(side) for side in sides]),
        ("import epq and build a request (ms)", [ms("dramatiq"), ms("dramatiq+pydantic"), ms("epq+request")]),
        ("modules loaded by the import", [float(costs[side][0][1]) for side in sides]),
    ]

    if not args.no_rss:
        base = args.redis.rstrip("/")
        apps = {
            "dramatiq": ("benchmarks.plain_app", _clean_env(BENCH_BROKER_URL=f"{base}/11")),
            "dramatiq+pydantic": ("benchmarks.plain_pydantic_app", _clean_env(BENCH_BROKER_URL=f"{base}/11")),
            "epq": (
                "epq.actors",
                _clean_env(EPQ_BROKER_URL=f"{base}/12", EPQ_HANDLERS="benchmarks.epq_handlers"),
            ),
        }
        rss: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(args.rss_runs):
            for side, (module, env) in apps.items():
                rss[side].append(idle_worker_rss(module, env, args.threads, args.settle_s))
        rows.append(
            (f"idle worker RSS (MiB, -p 1 -t {args.threads})", [statistics.median(rss[s]) for s in sides])
        )

    print(f"{'':40} {'dramatiq':>10} {'+pydantic':>10} {'epq':>10} {'epq/plain':>10} {'epq/+pyd.':>10}")
    for name, (plain, with_pydantic, ours) in rows:
        print(
            f"{name:40} {plain:10.1f} {with_pydantic:10.1f} {ours:10.1f}"
            f" {ours / plain:10.2f} {ours / with_pydantic:10.2f}"
        )
    print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.n} interpreters per import")


if __name__ == "__main__":
    main()
