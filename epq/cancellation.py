"""Cancelling a running job: a request in the state store, a watcher in every worker process, and
an exception raised in the handler's thread.

``QueueService.cancel_job`` on a running job leaves a request in the state store
(``StateStore.request_cancel``: one key per job, with a TTL). Every worker process runs a
:class:`Cancellation` middleware that notes which job each of its threads runs, and a watcher
thread that, only while the process runs jobs, asks the store every ``POLL_INTERVAL_MS`` which of
them have a request (one round trip for all of them: ``StateStore.cancel_requests``). A job found
there is interrupted with :class:`JobCancelled`, raised in its worker thread the way Dramatiq's
``TimeLimit`` raises ``TimeLimitExceeded`` (``dramatiq.threading.raise_thread_exception``: an
asynchronous exception, delivered the next time the thread runs Python bytecode). ``EpqRetries``
then records the job ``cancelled``, frees its uniqueness key, and does not retry it.

The exception is raised only while the thread is inside the handler (:func:`handler_scope`, which
``EpqActor``'s job function enters): never while epq's middleware write the job's outcome. A
request seen before the handler began stops it as it begins; one seen after it returned is too
late, and the job ends as it ended (its record keeps ``cancel_requested_at``). An interruption sent
just as the handler returns is settled when the scope is left: the job is cancelled, whether the
exception was delivered yet or not (a pending one is withdrawn and raised there instead), so it
can never land in a middleware hook.

What cannot be interrupted: a thread blocked in one call into C (a socket read without a timeout,
one long ``time.sleep``, ``threading.Event.wait``, a lock) gets the exception only when that call
returns to Python; a handler that catches ``BaseException`` and carries on runs to its end (its
job is recorded cancelled all the same). Only CPython can raise an exception in another thread;
elsewhere a handler sees the request through :func:`cancel_requested` alone.

Times are milliseconds.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Interrupt
from dramatiq.threading import current_platform, raise_thread_exception

from .backends.base import StateStore, in_flight

logger = logging.getLogger("epq.cancellation")

#: How often a worker process that runs jobs looks for requests to cancel them.
POLL_INTERVAL_MS = 200
#: How long a cancel request outlives the job's time limit: long enough for a job whose worker
#: died to be delivered again (and cancelled then), short enough that a request that came too
#: late does not linger.
REQUEST_GRACE_MS = 60_000
#: The time limit a job without one has (Dramatiq's ``TimeLimit`` default).
DEFAULT_TIME_LIMIT_MS = 600_000
#: At most one warning this often while the state store cannot be read for cancel requests.
_WARN_EVERY_S = 30.0


class JobCancelled(Interrupt):
    """Raised in a handler's thread when its job is cancelled while it runs
    (``QueueService.cancel_job``).

    A ``dramatiq.Interrupt`` (a ``BaseException``, as Dramatiq's ``TimeLimitExceeded``), so that
    ``except Exception`` in a handler does not swallow it; ``finally`` blocks and ``with`` blocks
    run as the handler unwinds. The job is recorded ``cancelled`` and never retried.
    """

    def __str__(self) -> str:
        return super().__str__() or "the job was cancelled while it ran"


def request_ttl_ms(time_limit_ms: int | None) -> int:
    """How long a request to cancel a job with this time limit is kept."""
    return int(time_limit_ms or DEFAULT_TIME_LIMIT_MS) + REQUEST_GRACE_MS


_current = threading.local()


def cancel_requested() -> bool:
    """Whether the job this thread runs has been cancelled (False outside a job).

    On CPython the handler is interrupted at once (:class:`JobCancelled`), so this is for a
    handler that catches the interruption to wind down, or that runs where threads cannot be
    interrupted. Costs a thread-local lookup.
    """
    job: _RunningJob | None = getattr(_current, "job", None)
    return job is not None and job.requested


def _withdraw_interrupt(thread_id: int) -> None:
    """Withdraw an exception raised in ``thread_id`` and not delivered yet (CPython)."""
    if current_platform == "CPython":
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


class _RunningJob:
    """A job one worker thread runs, as the watcher sees it; every field is read and written
    under the middleware's lock."""

    __slots__ = ("in_handler", "job_id", "lock", "requested", "sent", "thread_id")

    def __init__(self, job_id: str, thread_id: int, lock: threading.Lock) -> None:
        self.job_id = job_id
        self.thread_id = thread_id
        self.lock = lock
        self.in_handler = False  # inside handler_scope: an interruption may be raised
        self.requested = False  # the watcher found a request to cancel it
        self.sent = False  # an interruption was raised in its thread

    def __enter__(self) -> None:
        with self.lock:
            if self.requested:  # (seen before the handler began: it does not begin)
                raise JobCancelled("the job was cancelled before its handler began")
            self.in_handler = True

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self.lock:
            self.in_handler = False
            sent = self.sent
        if sent and not isinstance(exc, JobCancelled):
            # interrupted as the handler returned (not delivered yet), or a handler that swallowed
            # the interruption: the job is cancelled; nothing may land after the scope is left
            _withdraw_interrupt(self.thread_id)
            raise JobCancelled() from exc

    def interrupt(self) -> None:
        """Note the request and, inside the handler, raise :class:`JobCancelled` in its thread
        (once); called with the lock held."""
        self.requested = True
        if self.in_handler and not self.sent:
            self.sent = True
            raise_thread_exception(self.thread_id, JobCancelled)  # type: ignore[no-untyped-call]


class _NoScope:
    """The scope of a handler run outside a watched worker thread: nothing to do."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SCOPE = _NoScope()


def handler_scope() -> _RunningJob | _NoScope:
    """The context in which a job's handler may be interrupted (``with handler_scope(): ...``);
    ``EpqActor``'s job function runs the handler in it."""
    job: _RunningJob | None = getattr(_current, "job", None)
    return _NO_SCOPE if job is None else job


class Cancellation(dramatiq.Middleware):
    """Interrupts the handlers of jobs cancelled while they run, in every worker process.

    Notes which epq job each worker thread runs (from its start, ``JobRecords``' hook, to its
    end: it must come after ``JobRecords``), and runs a watcher thread from worker boot to
    shutdown that polls the state store for requests to cancel them while any run.

    Parameters:
      store: the state store cancel requests are left in.
      interval_ms: how often to look for requests while jobs run.
    """

    def __init__(self, store: StateStore, *, interval_ms: int = POLL_INTERVAL_MS) -> None:
        self.store = store
        self.interval_ms = interval_ms
        self._lock = threading.Lock()
        self._running: dict[int, _RunningJob] = {}  # thread id -> its job
        self._busy = threading.Event()  # set while jobs run (and to wake the watcher to stop)
        self._stop = threading.Event()
        self._workers = 0
        self._watcher: threading.Thread | None = None
        self._warned_at = 0.0

    # ---- the watcher ---------------------------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        with self._lock:
            self._workers += 1
            if self._watcher is not None:
                return
            self._stop.clear()
            if not self._running:
                self._busy.clear()
            self._watcher = threading.Thread(target=self._watch, name="epq-cancel-watcher", daemon=True)
        self._watcher.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        with self._lock:
            self._workers -= 1
            watcher = self._watcher if self._workers <= 0 else None
            if watcher is not None:
                self._watcher = None
                self._stop.set()
                self._busy.set()
        if watcher is not None and watcher.is_alive():
            watcher.join(5)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._busy.wait()
            if self._stop.wait(self.interval_ms / 1000):
                return
            try:
                self.poll()
            except Exception as exc:
                now = time.monotonic()
                if now - self._warned_at >= _WARN_EVERY_S:
                    self._warned_at = now
                    logger.warning("Could not look for cancelled jobs (trying again): %r", exc)

    def poll(self) -> list[str]:
        """Look for requests to cancel the jobs this process runs, in one round trip, and
        interrupt them; return the ids of those found."""
        with self._lock:
            job_ids = sorted({job.job_id for job in self._running.values() if not job.requested})
        if not job_ids:
            return []
        found = self.store.cancel_requests(job_ids)
        if found:
            wanted = set(found)
            with self._lock:
                for job in self._running.values():
                    if job.job_id in wanted and not job.requested:
                        logger.info("Cancelling job %s, which this process runs", job.job_id)
                        job.interrupt()
        return found

    # ---- the jobs each thread runs -------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        actor = broker.actors.get(message.actor_name)
        if actor is None or "max_attempts" not in actor.options:
            return  # (only epq jobs have records, and so can be cancelled)
        thread_id = threading.get_ident()
        job = _RunningJob(message.message_id, thread_id, self._lock)
        with self._lock:
            self._running[thread_id] = job
            self._busy.set()
        _current.job = job

    def _end(self, message: MessageProxy) -> None:
        """Forget the job this thread ran; a request the watcher found stays on the message
        (``InFlight.cancel_requested``) for ``EpqRetries``."""
        thread_id = threading.get_ident()
        with self._lock:
            job = self._running.get(thread_id)
            if job is None or job.job_id != message.message_id:
                return
            del self._running[thread_id]
            if not self._running and not self._stop.is_set():
                self._busy.clear()
            requested = job.requested
        _current.job = None
        if requested:
            in_flight(message).cancel_requested = True

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        self._end(message)
        if exception is None and in_flight(message).cancel_requested:
            # the handler returned before the request reached it: the job completes, and the
            # request is dropped so that it cannot stop a later delivery of the job
            self._forget(message.message_id)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._end(message)

    def _forget(self, job_id: str) -> None:
        try:
            self.store.forget_cancel(job_id)
        except Exception as exc:  # (it expires on its own)
            logger.warning("Could not drop the cancel request of job %s: %r", job_id, exc)

    def running(self) -> Sequence[str]:
        """The ids of the jobs this process's threads run now (for tests and diagnostics)."""
        with self._lock:
            return [job.job_id for job in self._running.values()]
