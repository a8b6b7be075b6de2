"""The benchmark harness runs (tiny sizes, stub broker only): it must not rot between runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_URL, redis_available
from tests.support.postgres import POSTGRES_URL
from tests.support.workers import ROOT


def _compare(tmp_path: Path, args: str) -> tuple[str, Any]:
    """Run ``benchmarks/compare.py`` on the stub broker with ``args``: its output and its JSON."""
    server = REDIS_URL.rsplit("/", 1)[0]  # the test Redis server; compare.py uses its databases 8-10
    redis_available(f"{server}/8").close()  # where the jobs note themselves
    out_file = tmp_path / "run.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--redis", server, "--brokers", "stub",
         *args.split(), "--json", str(out_file)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout, json.loads(out_file.read_text())


@pytest.mark.redis
def test_compare_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    stdout, result = _compare(
        tmp_path, "--n 60 --rounds 2 --drain 60 --latency-jobs 5 --latency-gap-ms 1 --scheduled 0"
    )
    assert "single enqueue (jobs/s)" in stdout
    assert "epq/plain" in stdout
    ratios = result["ratios"]["stub"]
    for key in (
        "single_enqueue_per_s",
        "bulk_enqueue_per_s",
        "drain_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
    ):
        assert ratios[key] > 0, key
    assert result["results"]["stub"]["epq"]["drain_per_s"] > 0


@pytest.mark.redis
def test_compare_metrics_ab_prints_paired_ratios_and_cpu_per_job(tmp_path: Path) -> None:
    stdout, result = _compare(tmp_path, "--metrics-ab 2 --n 40 --drain 40 --share-drain 200")
    assert "drain CPU (us/job)" in stdout
    stub = result["metrics_ab"]["stub"]
    for measure in ("enqueue", "drain", "enqueue_cpu_us", "drain_cpu_us"):
        values = stub[measure]
        assert len(values["rounds"]["off"]) == len(values["rounds"]["on"]) == 2, measure
        assert min(values["off"], values["on"]) > 0, measure
        assert values["low"] <= values["paired"] <= values["high"], measure
    assert 0 <= stub.get("worker_cpu_in_metrics", 0) < 1  # (only with py-spy on the PATH)


@pytest.mark.redis
def test_memory_prints_bytes_per_job_waiting_completed_locked_dead_and_scheduled() -> None:
    server = REDIS_URL.rsplit("/", 1)[0]  # the test Redis server; memory.py uses its databases 11-12
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--redis", server, "--n", "300", "--sizing"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines() if line[:1].isalpha()}
    plain, ours = (float(v) for v in rows["waiting"][:2])
    assert plain > 0
    assert ours > plain  # a waiting epq job also has its record and its lock
    assert float(rows["completed"][3]) > 0  # (after "(history kept)": plain, epq)
    assert float(rows["lock,"][4]) > 0  # "lock, its record forgotten": a lock per job is left
    for row in ("dead", "scheduled"):
        plain, ours = (float(v) for v in rows[row][-3:-1])
        # (plain Dramatiq's few bytes a job can read below 0 at this small n: allocator noise)
        assert ours > 0, row
        assert plain < ours, row  # epq also keeps a record (and a lock) of the job


@pytest.mark.redis
def test_cost_prints_the_cost_per_job_against_plain() -> None:
    server = REDIS_URL.rsplit("/", 1)[0]  # the test Redis server: the jobs note themselves in database 8
    redis_available(f"{server}/8").close()
    args = f"--brokers stub --redis {server} --results {server}/8 --n 200 --no-throughput"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cost.py"), *args.split()],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = {" ".join(line.split()[:3]): line.split()[-3:] for line in run.stdout.splitlines()}
    for row in ("stub enq CPU", "stub run CPU"):
        plain, ours, ratio = rows[row]
        assert float(plain) > 0
        assert float(ours) > 0
        assert ratio.endswith("x")


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_outbox_prints_the_latency_and_the_rates() -> None:
    server = REDIS_URL.rsplit("/", 1)[0]  # the test Redis server; outbox.py uses its databases 8, 10, 11
    redis_available(f"{server}/8").close()
    args = f"--redis {server} --brokers redis --n 20 --rounds 1 --latency-jobs 5"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "outbox.py"), *args.split(), "--postgres", POSTGRES_URL],
        capture_output=True, text=True, timeout=170, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    latency = [line.split() for line in run.stdout.splitlines() if line.startswith("redis ")]
    assert [row[1:3] for row in latency] == [["in", "worker"], ["epq", "relay"]]
    assert all(0 < float(row[5]) < 10_000 for row in latency)  # p99, ms
    rates = {line.rsplit(None, 2)[0]: float(line.split()[-2]) for line in run.stdout.splitlines()[-7:]}
    assert set(rates) == {"enqueue_*", "tx=conn", "app write", "app write + tx=conn", "tx=session",
                          "enqueue_many", "enqueue_many tx=conn"}  # fmt: skip
    assert all(rate > 0 for rate in rates.values())
