"""``EpqMiddleware``: what a worker process does when it boots and when it stops."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import dramatiq

from ..backends.base import backend_of
from ..concurrency import describe
from ..handlers import get_upgrades, import_handler_modules, missing_kinds, name_of
from ..kinds import KINDS
from ..outage import worker_booting, worker_stopping

logger = logging.getLogger("epq")


class EpqMiddleware(dramatiq.Middleware):
    """Loads handler modules when a worker boots; the home of epq's per-job hooks.

    Parameters:
      handler_modules: modules to import in each worker process (``EPQ_HANDLERS``).
    """

    def __init__(self, *, handler_modules: Sequence[str] = ()) -> None:
        self.handler_modules = tuple(handler_modules)

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        worker_booting()
        import_handler_modules(self.handler_modules)
        missing = missing_kinds()
        if missing:
            logger.warning(
                "No handler registered for %s: their jobs will be dead-lettered. "
                "Register handlers with @epq.handler(kind) in a module named in EPQ_HANDLERS.",
                ", ".join(missing),
            )
        for kind in KINDS:
            upgrades = get_upgrades(kind)
            if upgrades:
                logger.info(
                    "%s payloads are upgraded by %s, in this order", kind, ", ".join(map(name_of, upgrades))
                )
        backend = backend_of(broker)
        if backend is not None and backend.queue_concurrency:
            served = worker.consumer_whitelist
            budgets = {q: n for q, n in backend.queue_concurrency.items() if not served or q in served}
            logger.info(
                "Jobs at once per queue in this process: %s (EPQ_QUEUE_CONCURRENCY); %d worker threads",
                describe(budgets),
                worker.worker_threads,
            )

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        worker_stopping()  # threads waiting for the state store give their messages back
