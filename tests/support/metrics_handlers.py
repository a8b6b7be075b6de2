"""The metrics tests' handler module for worker processes (``EPQ_HANDLERS``): registers
``metrics_jobs.run_job`` for ``register_job``."""

from __future__ import annotations

import epq
from tests.support.metrics_jobs import run_job

epq.handler("register_job")(run_job)
