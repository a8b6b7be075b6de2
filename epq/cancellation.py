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


class _Settled(BaseException):
    """The marker :func:`_settle_interrupt` raises in its own thread and catches."""


#: How many loop turns :func:`_settle_interrupt` gives its marker to land (it lands on the first).
_SETTLE_TURNS = 100_000


def _settle_interrupt() -> None:
    """Leave no interruption pending in this thread (CPython): one sent but not delivered yet is
    replaced by a marker, which lands here and is caught.

    Not ``PyThreadState_SetAsyncExc(id, NULL)``: on CPython before 3.13 that clears the pending
    exception but leaves the interpreter's "async exception" flag set when none was pending (a
    handler that swallowed its interruption), and with that flag stuck every thread of the
    process takes the slow path at every check of the eval loop from then on, which starved a
    worker thread for minutes under coverage. A marker that is delivered clears the flag as any
    delivered exception does.
    """
    if current_platform != "CPython":
        return
    marker = ctypes.py_object(_Settled)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), marker)
    try:
        for _ in range(_SETTLE_TURNS):  # (each turn is a check of the eval loop: it lands on the first)
            pass
    except _Settled:
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)


class _RunningJob:
    """A job one worker thread runs, as the watcher sees it. ``depth`` and ``sent`` change under
    the middleware's lock (the handshake that keeps an interruption inside the handler);
    ``requested`` only ever turns true."""

    __slots__ = ("depth", "lock", "message", "requested", "sent", "thread_id")

    def __init__(self, message: MessageProxy, thread_id: int, lock: threading.Lock) -> None:
        self.message = message  # (its id is read by the watcher, off the job's path)
        self.thread_id = thread_id
        self.lock = lock
        self.depth = 0  # inside handler_scope (nested when a handler calls an actor inline)
        self.requested = False  # the watcher found a request to cancel it
        self.sent = False  # an interruption was raised in its thread

    def __enter__(self) -> None:
        with self.lock:
            if self.requested:  # (seen before the handler began: it does not begin)
                raise JobCancelled("the job was cancelled before its handler began")
            self.depth += 1

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self.lock:
            self.depth -= 1
            sent = self.sent
        if sent and not isinstance(exc, JobCancelled):
            # interrupted as the handler returned (not delivered yet), or a handler that swallowed
            # the interruption: the job is cancelled; nothing may land after the scope is left
            _settle_interrupt()
            raise JobCancelled() from exc

    @property
    def job_id(self) -> str:
        return str(self.message.message_id)

    def interrupt(self) -> None:
        """Note the request and, inside the handler, raise :class:`JobCancelled` in its thread
        (once); called with the lock held."""
        self.requested = True
        if self.depth and not self.sent:
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
            self._watcher = threading.Thread(target=self._watch, name="epq-cancel-watcher", daemon=True)
        self._watcher.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        with self._lock:
            self._workers -= 1
            watcher = self._watcher if self._workers <= 0 else None
            if watcher is not None:
                self._watcher = None
                self._stop.set()
        if watcher is not None and watcher.is_alive():
            watcher.join(5)

    def _watch(self) -> None:
        # (it wakes every interval whatever happens, which costs nothing to speak of; it asks the
        # store only while jobs run: a per-job signal to wake it would cost every job more)
        while not self._stop.wait(self.interval_ms / 1000):
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
        running = list(self._running.values())  # (one step under the GIL: threads come and go)
        job_ids = sorted({job.job_id for job in running if not job.requested})
        if not job_ids:
            return []
        found = self.store.cancel_requests(job_ids)
        if found:
            wanted = set(found)
            with self._lock:
                for job in running:
                    if job.job_id in wanted and not job.requested:
                        logger.info("Cancelling job %s, which this process runs", job.job_id)
                        job.interrupt()
        return found

    # ---- the jobs each thread runs -------------------------------------------------------------

    # Each job costs two lock round trips (into and out of the handler's scope); a thread adds
    # and removes its own entry in ``_running`` without the lock (a dict's item set and delete
    # are one step each under the GIL, and the watcher copies the values in one step).

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # (every message: only epq jobs can have a request, and checking costs more than it saves)
        thread_id = threading.get_ident()
        job = _current.job = _RunningJob(message, thread_id, self._lock)
        self._running[thread_id] = job

    def _end(self, message: MessageProxy) -> bool:
        """Forget the job this thread ran; return whether the watcher found a request to cancel
        it (noted on the message, ``InFlight.cancel_requested``, for ``EpqRetries``)."""
        job: _RunningJob | None = getattr(_current, "job", None)
        if job is None:
            return False
        _current.job = None
        if self._running.get(job.thread_id) is job:
            del self._running[job.thread_id]
        if job.requested:
            in_flight(message).cancel_requested = True
        return job.requested

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        if self._end(message) and exception is None:
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
