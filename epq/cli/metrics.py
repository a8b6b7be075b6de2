"""``epq metrics``: serve the store-side Prometheus metrics (``epq.metrics.StoreCollector``) on
their own, for a deployment that scrapes one exporter rather than every worker."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence

from .. import _runtime, metrics
from ..settings import get_settings
from ._broker import open_broker
from .common import command

#: The port ``epq metrics`` serves on without ``--port`` or ``EPQ_METRICS_PORT``.
DEFAULT_PORT = 9808


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    open_broker(args, may_start_embedded=False)
    runtime = _runtime.current()
    assert runtime is not None
    registry = metrics.store_registry(runtime.state, runtime.records)
    if args.once:
        sys.stdout.write(metrics.client().generate_latest(registry).decode())
        return 0
    settings = get_settings()
    port = args.port if args.port is not None else settings.metrics_port or DEFAULT_PORT
    host = args.host if args.host is not None else settings.metrics_host
    metrics.serve(registry, port, host)
    print(f"epq: serving the store metrics on http://{host}:{port}/metrics", file=sys.stderr, flush=True)
    threading.Event().wait()  # until interrupted
    return 0  # pragma: no cover - the wait above does not end
