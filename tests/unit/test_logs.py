"""Job-aware logs: what a handler (and epq) logs while a job runs carries its id, kind and attempt."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import CurrentMessage

from epq.logs import JobContextFilter, current_job
from epq.testing import drain
from tests.support.helpers import VALID, actor


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(JobContextFilter())
        self.setFormatter(logging.Formatter("[%(epq_kind)s %(epq_job_id)s #%(epq_attempt)s] %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def kept() -> Any:
    handler = Kept()
    logger = logging.getLogger("app")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def test_a_handler_log_line_carries_the_job_id_kind_and_attempt(
    epq_broker: dramatiq.Broker, epq_worker: dramatiq.Worker, epq_handlers: Any, kept: Kept
) -> None:
    # Given a handler that logs, and fails its first attempt
    def run(request: Any) -> None:
        logging.getLogger("app").info("working")
        if not CurrentMessage.get_current_message().options.get("retries"):
            raise dramatiq.Retry("again", delay=10)

    epq_handlers.register("register_job", run)
    # When a job runs twice
    job_id = actor("register_job").send(**VALID["register_job"]).message_id
    drain(epq_broker, epq_worker, fail_fast=False)
    # Then each line names the job, its kind and its attempt
    assert kept.lines == [f"[register_job {job_id} #1] working", f"[register_job {job_id} #2] working"]


def test_outside_a_job_the_fields_are_dashes(kept: Kept) -> None:
    logging.getLogger("app").info("idle")
    assert current_job() is None
    assert kept.lines == ["[- - #-] idle"]
