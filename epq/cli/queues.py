"""``epq queues``: each queue with whether it is paused, its depth per priority and its lag;
``epq queues pause QUEUE`` and ``epq queues resume QUEUE`` (``epq.pausing``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..models import QueueInfo
from ..priority import LANES
from ..service import QueueService
from ._broker import open_broker
from .common import command
from .ops import table


def _lag(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.1f}m"


def _as_json(info: QueueInfo) -> dict[str, object]:
    data = info.model_dump(mode="json")
    data["depth"] = {str(p): n for p, n in info.depth.items()}
    return data


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    broker = open_broker(args, may_start_embedded=False)
    svc = QueueService(broker)
    action = getattr(args, "queues_command", None)
    if action is not None:
        changed = svc.pause_queue(args.queue) if action == "pause" else svc.resume_queue(args.queue)
        paused = action == "pause"
        if args.json:
            print(json.dumps({"queue": args.queue, "paused": paused, "changed": changed}))
        elif paused:
            print(f"queue {args.queue} paused" + ("" if changed else " (it was already)")
                  + ": workers start none of its jobs until `epq queues resume`")  # fmt: skip
        else:
            print(f"queue {args.queue} resumed" if changed else f"queue {args.queue} was not paused")
        return 0
    infos = svc.queues()
    if args.json:
        print(json.dumps([_as_json(info) for info in infos], indent=2))
        return 0
    headers = ("queue", "state", *(f"p{p}" for p in LANES), "lag", "running", "scheduled")
    rows = [
        [info.name, "paused" if info.paused else "active", *(info.depth[p] for p in LANES),
         _lag(info.lag_seconds), info.running, info.scheduled]
        for info in infos
    ]  # fmt: skip
    print(table(headers, rows))
    return 0
