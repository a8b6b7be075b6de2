"""Prometheus metrics, one naming scheme (``epq_`` prefix, units in the names, bounded labels:
kind, queue, priority, state, outcome; never a job id).

Two sources:

- **store-side** (:class:`StoreCollector`): read from the state and record stores at each scrape,
  so any process can serve them and they mean the same on every broker: jobs per queue x
  priority x state, the oldest waiting job's age, the schedule, dead jobs, uniqueness locks, and
  the enqueues refused as duplicates (which every enqueuing process counts into the store) and
  those that replaced a waiting job's payload (counted by the store as it replaces);
- **worker-side** (:class:`WorkerInstruments`): counted where things happen: jobs started and
  their outcomes per kind, handler duration, enqueue-to-start latency and duplicate starts. A
  Dramatiq worker with ``EPQ_METRICS_PORT`` keeps them in ``prometheus_client``'s multiprocess
  mode (``dramatiq -p N`` forks) and serves ``/metrics`` for all its processes
  (``epq.middleware.metrics``); ``epq metrics`` serves the store-side ones alone.

``prometheus_client`` is loaded on first use (:data:`PROMETHEUS_CLIENT`, a named late import like
``epq.cli.COMMANDS``): only then does it read ``PROMETHEUS_MULTIPROC_DIR``, which a worker sets at
process boot; a process with metrics off never loads it. See the README for the metric list.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import importlib
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from .backends.base import RecordStore, StateStore, split_counter_group

#: The module loaded on first use (see the module docstring).
PROMETHEUS_CLIENT = "prometheus_client"
#: The environment variable that puts ``prometheus_client`` in multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# ---- names --------------------------------------------------------------------------------------

JOBS = "epq_jobs"
OLDEST_WAITING = "epq_oldest_waiting_seconds"
SCHEDULED = "epq_scheduled_jobs"
SCHEDULED_DUE = "epq_scheduled_due_jobs"
DEAD = "epq_dead_jobs"
UNIQUE_LOCKS = "epq_unique_locks"
STARTED = "epq_jobs_started"  # counters get their ``_total`` from prometheus_client
PROCESSED = "epq_jobs_processed"
DURATION = "epq_job_duration_seconds"
ENQUEUE_TO_START = "epq_enqueue_to_start_seconds"
DUPLICATES_REFUSED = "epq_duplicates_refused"
DUPLICATES_REPLACED = "epq_duplicates_replaced"
DUPLICATE_STARTS = "epq_duplicate_starts"

#: The outcomes of ``epq_jobs_processed_total``: each finished attempt counts once.
OUTCOMES = ("completed", "retried", "discarded", "failed", "cancelled", "snoozed")
#: Handler durations, seconds: from a few milliseconds to the kinds' time limits.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
#: Enqueue-to-start latency, seconds: an idle worker starts a job within a poll; a backlog, later.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

#: How often a worker process writes the jobs it counted (:class:`Recorder`), seconds.
FLUSH_S = 0.5

_log = logging.getLogger(__name__)
_lock = threading.RLock()
_client: Any = None


def client() -> Any:
    """The ``prometheus_client`` module, loaded on first use."""
    global _client
    with _lock:
        if _client is None:
            _client = importlib.import_module(PROMETHEUS_CLIENT)
        return _client


# ---- store-side ---------------------------------------------------------------------------------


def lag_ms(records: RecordStore, now_ms: int) -> dict[tuple[str, int], int]:
    """The lag per ``(queue, priority)`` with a job waiting to start: how long, at ``now_ms``,
    the oldest has waited since it became due (0 or more)."""
    return {group: max(0, now_ms - since) for group, since in records.oldest_waiting().items()}


class StoreCollector:
    """A ``prometheus_client`` collector that reads the store-side metrics at each scrape.

    Parameters:
      state, records: the stores of the deployment (any broker's).
    """

    def __init__(self, state: StateStore, records: RecordStore) -> None:
        self.state = state
        self.records = records

    def describe(self) -> list[Any]:
        return []  # (read at scrape time: nothing to check at registration)

    def collect(self) -> Iterator[Any]:
        core = client().metrics_core
        jobs = core.GaugeMetricFamily(JOBS, "Jobs per queue, priority and state (job records).",
                                      labels=["queue", "priority", "state"])  # fmt: skip
        waiting_groups: set[tuple[str, int]] = set()
        for group, count in sorted(self.records.counters().items()):
            queue, priority, state = split_counter_group(group)
            jobs.add_metric([queue, str(priority), state], max(0, count))
            if state == "available":
                waiting_groups.add((queue, priority))
        yield jobs

        now_ms = self.state.now_ms()
        oldest = core.GaugeMetricFamily(
            OLDEST_WAITING,
            "Age of the oldest job waiting to start (available), per queue and priority: the lag.",
            labels=["queue", "priority"],
        )
        lags = lag_ms(self.records, now_ms)
        for queue, priority in sorted(waiting_groups | lags.keys()):
            oldest.add_metric([queue, str(priority)], lags.get((queue, priority), 0) / 1000)
        yield oldest

        yield core.GaugeMetricFamily(
            SCHEDULED, "Jobs in the durable schedule (delayed runs, retries, serial jobs held).",
            value=self.state.schedule_size() + self.state.serial_held(),
        )  # fmt: skip
        yield core.GaugeMetricFamily(
            SCHEDULED_DUE, "Scheduled jobs due but not yet promoted to their queue.",
            value=self.state.schedule_due(now_ms),
        )  # fmt: skip

        dead = core.GaugeMetricFamily(DEAD, "Dead (discarded) jobs with a record, per queue.",
                                      labels=["queue"])  # fmt: skip
        for queue, count in sorted(dead_per_queue(self.records).items()):
            dead.add_metric([queue], count)
        yield dead

        refused = core.CounterMetricFamily(
            DUPLICATES_REFUSED, "Enqueues refused because another job held the unique key, per kind.",
            labels=["kind"],
        )  # fmt: skip
        for kind, count in sorted(self.state.refused().items()):
            refused.add_metric([kind], count)
        yield refused

        replaced = core.CounterMetricFamily(
            DUPLICATES_REPLACED,
            "Enqueues whose payload replaced that of a waiting job of the same key (uniqueness modes "
            "replace and debounce), per kind.",
            labels=["kind"],
        )
        for kind, count in sorted(self.records.replacements().items()):
            replaced.add_metric([kind], count)
        yield replaced

        locks = core.GaugeMetricFamily(UNIQUE_LOCKS, "Uniqueness locks held, per kind.", labels=["kind"])
        for kind, count in sorted(self.state.unique_locks().items()):
            locks.add_metric([kind], count)
        yield locks


def dead_per_queue(records: RecordStore) -> dict[str, int]:
    """Dead jobs per queue, from their records (the index drops those whose record expired)."""
    out: dict[str, int] = {}
    ids = records.dead_ids(10**9)
    for fields in records.get_many(ids) if ids else ():
        if fields is not None and fields.get("state") == "discarded":
            out[fields["queue"]] = out.get(fields["queue"], 0) + 1
    return out


def store_registry(state: StateStore, records: RecordStore) -> Any:
    """A registry with the store-side metrics alone (what ``epq metrics`` serves)."""
    registry = client().CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(state, records))
    return registry


# ---- worker-side --------------------------------------------------------------------------------


class WorkerInstruments:
    """The worker-side metrics of one process, registered on ``registry``.

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before ``prometheus_client`` was
    loaded) their values live in files that every process of a worker shares; the registry only
    matters in a single process.
    """

    def __init__(self, registry: Any) -> None:
        prom = client()
        self.started = prom.Counter(
            STARTED, "Jobs started (each attempt), per kind.", ["kind"], registry=registry
        )
        self.processed = prom.Counter(
            PROCESSED,
            "Finished attempts per kind and outcome: completed, retried (failed, another attempt "
            "scheduled), discarded (dead), failed (failed, given back without an outcome), "
            "cancelled (skipped at start), snoozed.",
            ["kind", "outcome"],
            registry=registry,
        )
        self.duration = prom.Histogram(
            DURATION, "Handler run time, per kind.", ["kind"], buckets=DURATION_BUCKETS, registry=registry
        )
        self.enqueue_to_start = prom.Histogram(
            ENQUEUE_TO_START,
            "From when a job was due (enqueued, or its delay or backoff over) to its start, per kind.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.duplicate_starts = prom.Counter(
            DUPLICATE_STARTS,
            "Starts of a job whose record was already running or completed (delivered twice), per kind.",
            ["kind"],
            registry=registry,
        )
        self._kinds: dict[str, KindInstruments] = {}

    def of(self, kind: str) -> KindInstruments:
        """The instruments' children for ``kind`` (made once: a worker counts each job with them)."""
        found = self._kinds.get(kind)
        if found is None:
            found = self._kinds[kind] = KindInstruments(
                started=self.started.labels(kind),
                duration=self.duration.labels(kind),
                enqueue_to_start=self.enqueue_to_start.labels(kind),
                duplicate_starts=self.duplicate_starts.labels(kind),
                outcomes={outcome: self.processed.labels(kind, outcome) for outcome in OUTCOMES},
            )
        return found


class Recorder:
    """Counts a worker's jobs into :class:`WorkerInstruments` in batches: a worker thread only
    appends an event (a deque's append: no lock), and a thread of this recorder adds them up and
    writes them every ``FLUSH_S`` seconds (:meth:`flush` at once), one write per series rather than
    several per job (in multiprocess mode each write is a locked write to a shared file). What a
    scrape sees is at most that much behind."""

    def __init__(self, instruments: WorkerInstruments) -> None:
        self.instruments = instruments
        self._events: deque[tuple[str, str | None, float, bool]] = deque()
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forget_thread)  # (threads do not survive a fork)

    def started(self, kind: str, enqueue_to_start_s: float) -> None:
        """A job of ``kind`` started, this long after it was due."""
        self._events.append((kind, None, enqueue_to_start_s, False))
        self._running()

    def ended(self, kind: str, outcome: str, duration_s: float | None, duplicate_start: bool) -> None:
        """An attempt of ``kind`` ended with ``outcome`` (see ``OUTCOMES``) after ``duration_s``
        in its handler (None: it did not run); ``duplicate_start``: its record was already running
        or completed when it started."""
        self._events.append((kind, outcome, -1.0 if duration_s is None else duration_s, duplicate_start))
        self._running()

    def _running(self) -> None:
        if self._thread is None:
            with self._flushing:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="epq-metrics", daemon=True)
                    self._thread.start()

    def _forget_thread(self) -> None:
        self._thread = None
        self._flushing = threading.Lock()

    def _loop(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            self.flush()

    def flush(self) -> None:
        """Write the events recorded so far."""
        with self._flushing:
            started: dict[str, int] = {}
            ended: dict[tuple[str, str], int] = {}
            duplicates: dict[str, int] = {}
            latencies: dict[str, list[float]] = {}
            durations: dict[str, list[float]] = {}
            events = self._events
            while events:
                kind, outcome, value, duplicate = events.popleft()
                if outcome is None:
                    started[kind] = started.get(kind, 0) + 1
                    latencies.setdefault(kind, []).append(value)
                    continue
                ended[kind, outcome] = ended.get((kind, outcome), 0) + 1
                if value >= 0:
                    durations.setdefault(kind, []).append(value)
                if duplicate:
                    duplicates[kind] = duplicates.get(kind, 0) + 1
            of = self.instruments.of
            for kind, count in started.items():
                of(kind).started.inc(count)
            for kind, values in latencies.items():
                observe_many(of(kind).enqueue_to_start, values)
            for kind, values in durations.items():
                observe_many(of(kind).duration, values)
            for (kind, outcome), count in ended.items():
                of(kind).outcomes[outcome].inc(count)
            for kind, count in duplicates.items():
                of(kind).duplicate_starts.inc(count)


def observe_many(histogram: Any, values: list[float]) -> None:
    """``histogram.observe`` for each of ``values``, with one write per bucket that grows (through
    the histogram's buckets and sum, as ``prometheus_client`` 0.x keeps them; one observe per value
    where it does not)."""
    buckets, bounds, total = (
        getattr(histogram, name, None) for name in ("_buckets", "_upper_bounds", "_sum")
    )
    if buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)
    total.inc(math.fsum(values))


class KindInstruments(NamedTuple):
    """The worker-side instruments of one kind (their labelled children)."""

    started: Any
    duration: Any
    enqueue_to_start: Any
    duplicate_starts: Any
    outcomes: dict[str, Any]


_instruments: WorkerInstruments | None = None
_recorder: Recorder | None = None
#: The instruments made on each registry (by id), with the registry: enabled again, they are reused.
_made: dict[int, tuple[Any, WorkerInstruments]] = {}


def enable(registry: Any = None) -> WorkerInstruments:
    """Record the worker-side metrics in this process, on ``registry`` (default:
    ``prometheus_client``'s global one, which an application that already serves ``/metrics``
    exposes). Idempotent: while on, the instruments in use stay. ``EPQ_METRICS=1`` (or
    ``EPQ_METRICS_PORT``) calls it when epq is set up."""
    global _instruments, _recorder
    with _lock:
        if _instruments is None:
            registry = registry if registry is not None else client().REGISTRY
            if id(registry) not in _made:
                _made[id(registry)] = (registry, WorkerInstruments(registry))
            _instruments = _made[id(registry)][1]
            _recorder = Recorder(_instruments)
        return _instruments


def disable() -> None:
    """Stop recording (the instruments stay registered where they were, and come back with
    :func:`enable` on the same registry)."""
    global _instruments, _recorder
    with _lock:
        if _recorder is not None:
            _recorder.flush()
        _instruments = _recorder = None


def instruments() -> WorkerInstruments | None:
    """This process's instruments, None while metrics are off."""
    return _instruments


def recorder() -> Recorder | None:
    """What a worker counts its jobs with, None while metrics are off."""
    return _recorder


def flush() -> None:
    """Write what this process counted so far (it does every ``FLUSH_S`` seconds): its worker's
    jobs and the duplicates it refused."""
    found = _recorder
    if found is not None:
        found.flush()
    _refusals.flush()


# ---- duplicates refused: counted in the state store ------------------------------------------


class _Refusals:
    """Enqueues refused as duplicates, counted in the state store (``StateStore.add_refused``) so
    that a scrape of any process sees every enqueuer's, the API servers' included. A refusal adds
    to this process's tally; a timer thread, started by the first refusal of a window, writes it
    ``FLUSH_S`` later in one round trip per store; :meth:`flush` writes at once (epq does before it
    closes its stores, and at exit). A write that fails (the store unreachable) is kept for the
    next window, up to ``KEEP_FAILED`` windows."""

    #: How many windows a tally that cannot be written is kept before it is dropped (a minute).
    KEEP_FAILED = 120

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[int, tuple[StateStore, dict[str, int], int]] = {}  # id(store) -> tally
        self._timer: threading.Timer | None = None
        atexit.register(self.flush)
        os.register_at_fork(after_in_child=self._forget)  # (the parent writes what it counted)

    def add(self, state: StateStore, kind: str, count: int) -> None:
        with self._lock:
            _store, tally, failures = self._tallies.get(id(state), (state, {}, 0))
            tally[kind] = tally.get(kind, 0) + count
            self._tallies[id(state)] = (state, tally, failures)
            self._arm()

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(FLUSH_S, self._on_timer)
            self._timer.name = "epq-refusals"
            self._timer.daemon = True
            self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
        self.flush()

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._tallies = {}
        self._timer = None

    def flush(self, state: StateStore | None = None) -> None:
        """Write the tallies (of ``state`` alone, when given)."""
        with self._lock:
            taken = {k: v for k, v in self._tallies.items() if state is None or v[0] is state}
            for key in taken:
                del self._tallies[key]
        for key, (store, tally, failures) in taken.items():
            try:
                store.add_refused(tally)
            except Exception as exc:  # the store unreachable, say: kept for the next window
                with self._lock:
                    _store, newer, _failures = self._tallies.get(key, (store, {}, 0))
                    for kind, count in newer.items():
                        tally[kind] = tally.get(kind, 0) + count
                    if failures + 1 < self.KEEP_FAILED:
                        self._tallies[key] = (store, tally, failures + 1)
                        self._arm()
                    else:
                        _log.warning("dropped a count of refused duplicates that could not be "
                                     "written to the state store: %s", exc)  # fmt: skip


_refusals = _Refusals()


def duplicates_refused(state: StateStore, kind: str, count: int = 1) -> None:
    """Count ``count`` enqueues of ``kind`` refused as duplicates, in ``state`` (within
    ``FLUSH_S``; metrics on or off: the count is the deployment's, served by whoever scrapes)."""
    if count:
        _refusals.add(state, kind, count)


def flush_refusals(state: StateStore | None = None) -> None:
    """Write the refused duplicates this process counted (in ``state`` alone, when given)."""
    _refusals.flush(state)


# ---- multiprocess mode --------------------------------------------------------------------------

_DB_FILE = re.compile(r".*_(\d+)\.db$")
#: A worker command's metric files directory under the temporary directory: this, its main pid.
_DIR_PREFIX = "epq-metrics-"


def multiprocess_dir(main_pid: int) -> Path:
    """Where a worker's processes keep their metric files: ``PROMETHEUS_MULTIPROC_DIR`` when set,
    else a directory per worker command (its main process's pid) under the temporary directory.
    Sets the variable, so that ``prometheus_client`` loads in multiprocess mode, and forgets the
    files of processes that are gone (a pid reused from an earlier run)."""
    given = os.environ.get(MULTIPROC_ENV)
    if not given:
        _forget_dead_dirs(Path(tempfile.gettempdir()), main_pid)
    path = Path(given) if given else Path(tempfile.gettempdir()) / f"{_DIR_PREFIX}{main_pid}"
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    for file in path.glob("*.db"):
        match = _DB_FILE.match(file.name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
    return path


def _forget_dead_dirs(parent: Path, main_pid: int) -> None:
    """Remove the directories of earlier worker commands whose main process is gone (each
    worker command without ``PROMETHEUS_MULTIPROC_DIR`` makes one, and nothing else would ever
    remove it): a host that restarts its workers would gather them for good."""
    for found in parent.glob(f"{_DIR_PREFIX}*"):
        pid = found.name[len(_DIR_PREFIX) :]
        if not pid.isdigit() or int(pid) == main_pid or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):  # (another worker starting removes it at once)
            shutil.rmtree(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_registry(path: Path, store: StoreCollector | None) -> Any:
    """What a worker serves: every process's worker-side metrics (the files under ``path``), and
    the store-side ones with ``store``."""
    registry = client().CollectorRegistry(auto_describe=False)
    registry.register(ProcessFiles(path))
    if store is not None:
        registry.register(store)
    return registry


class ProcessFiles:
    """The worker-side metrics of every process of a worker, read from their files as
    ``prometheus_client``'s ``MultiProcessCollector`` reads them, but for a file that a process
    is creating this instant: ``prometheus_client`` creates it empty and sizes it just after, and
    an empty file read would fail the whole scrape (a process's first job, say)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        merge = importlib.import_module(PROMETHEUS_CLIENT + ".multiprocess").MultiProcessCollector.merge
        for attempt in range(3):
            files = [str(file) for file in self.path.glob("*.db") if _has_data(file)]
            try:
                return merge(files, accumulate=True)
            except FileNotFoundError:  # (a dead process's file forgotten meanwhile: list again)
                if attempt == 2:
                    raise
        return []  # pragma: no cover - the loop returns or raises


def _has_data(file: Path) -> bool:
    try:
        return file.stat().st_size > 0
    except FileNotFoundError:
        return False


def serve(registry: Any, port: int, host: str) -> Any:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread; returns the server.

    Raises:
      OSError: the port is taken.
    """
    server, _thread = client().start_http_server(port, addr=host, registry=registry)
    return server
