"""A worker's counts written in batches (``epq.metrics.Recorder``) read as if written one by one."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from epq import metrics
from epq.metrics import DURATION_BUCKETS, Recorder, WorkerInstruments, observe_many


def test_observe_many_matches_one_observe_per_value() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    values = [0.0, 0.005, 0.0051, 0.7, 2.5, 30, 10_000, 1e-9]
    single = Histogram("h_seconds", "h", buckets=DURATION_BUCKETS, registry=one)
    for value in values:
        single.observe(value)
    observe_many(Histogram("h_seconds", "h", buckets=DURATION_BUCKETS, registry=many), values)
    strip = lambda text: [line for line in text.decode().splitlines() if "_created" not in line]  # noqa: E731
    assert strip(generate_latest(many)) == strip(generate_latest(one))


def test_a_flush_writes_every_event_recorded_since_the_last() -> None:
    registry = CollectorRegistry()
    recorder = Recorder(WorkerInstruments(registry))
    recorder.started("register_job", 0.2)
    recorder.started("register_job", 0.4)
    recorder.ended("register_job", "completed", 0.01, False)
    recorder.ended("register_job", "cancelled", None, False)
    recorder.ended("index_endpoint", "retried", 0.02, True)
    recorder.flush()
    value = registry.get_sample_value
    assert value("epq_jobs_started_total", {"kind": "register_job"}) == 2
    assert value("epq_enqueue_to_start_seconds_sum", {"kind": "register_job"}) == pytest.approx(0.6)
    assert value("epq_jobs_processed_total", {"kind": "register_job", "outcome": "completed"}) == 1
    assert value("epq_jobs_processed_total", {"kind": "register_job", "outcome": "cancelled"}) == 1
    assert value("epq_job_duration_seconds_count", {"kind": "register_job"}) == 1  # (cancelled: no run)
    assert value("epq_duplicate_starts_total", {"kind": "index_endpoint"}) == 1
    assert value("epq_duplicate_starts_total", {"kind": "register_job"}) == 0


def test_a_worker_scrape_skips_a_metrics_file_a_process_is_creating(tmp_path: Path) -> None:
    # Given the files of a worker's processes: one with a count, one just created (empty:
    # prometheus_client sizes it just after), which prometheus_client's own collector cannot read
    written = MmapedDict(str(tmp_path / "counter_4241.db"))
    key = mmap_key("epq_jobs_started", "epq_jobs_started_total", ["kind"], ["register_job"], "Jobs started.")
    written.write_value(key, 3.0, 0.0)
    written.close()
    (tmp_path / "counter_4242.db").write_bytes(b"")
    plain = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(plain, path=str(tmp_path))
    with pytest.raises(struct.error):
        generate_latest(plain)
    # When the worker's registry is scraped, Then the scrape succeeds, with the count
    registry = metrics.worker_registry(tmp_path, None)
    assert registry.get_sample_value("epq_jobs_started_total", {"kind": "register_job"}) == 3.0
