"""The benchmarks' epq handlers (EPQ_HANDLERS=benchmarks.epq_handlers): note the job, no work."""

from __future__ import annotations

from typing import Any

import epq
from benchmarks._report import report


@epq.handler("index_endpoint")
def index(request: epq.EnqueueIndexEndpointRequest) -> None:
    report(None)


@epq.handler("register_job")
def register(request: epq.RegisterJobRequest) -> None:
    sent_at: Any = request.job_metadata.get("sent_at")
    report(float(sent_at) if sent_at is not None else None)
