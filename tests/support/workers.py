"""Worker subprocesses for end-to-end tests, and the results their handlers report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import RESULTS_URL, redis_available

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: The handler modules worker subprocesses import (``dramatiq epq.actors MODULE``, ``EPQ_HANDLERS``).
E2E_HANDLERS = "tests.support.e2e_handlers"
HOLD_HANDLERS = "tests.support.hold_handlers"
PRIORITY_HANDLERS = "tests.support.priority_handlers"
CANCEL_HANDLERS = "tests.support.cancel_handlers"
CONCURRENCY_HANDLERS = "tests.support.concurrency_handlers"
PAUSE_HANDLERS = "tests.support.pause_handlers"


class Worker:
    """A worker subprocess and the results it reports."""

    def __init__(self, argv: list[str], env: dict[str, str], tmp_path: Path, key: str | None = None) -> None:
        self.results = redis_available(RESULTS_URL)
        self.key = key or f"epq:e2e:{uuid.uuid4()}"
        self.log = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EPQ_") or k.startswith("EPQ_TEST_")},
            "EPQ_HANDLERS": E2E_HANDLERS,
            "EPQ_TEST_RESULTS_URL": RESULTS_URL,
            "EPQ_TEST_RESULTS_KEY": self.key,
            "PYTHONPATH": str(ROOT),
            **env,
        }
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, env=full_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def collect(self, n: int, timeout: float = 45.0) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while len(got) < n:
            item = self.results.blpop([self.key], timeout=timeout)
            assert item is not None, (
                f"only {len(got)} of {n} jobs reported; worker log:\n{self.log.read_text()}"
            )
            got.append(json.loads(item[1]))
        return got

    def kill9(self) -> None:
        """SIGKILL the worker and every process it started, as a crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.results.delete(self.key)
        self.results.close()
