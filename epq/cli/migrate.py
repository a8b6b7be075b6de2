"""``epq migrate-queues``: re-creates RabbitMQ queues declared without epq's priority argument."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..backends.rabbitmq.migrate import migrate_queues
from ._broker import open_broker
from .common import command


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    broker = open_broker(args, may_start_embedded=False)
    done = migrate_queues(broker)
    if args.json:
        print(json.dumps([vars(m) for m in done], indent=2))
    elif not done:
        print("nothing to migrate: only RabbitMQ queues need it")
    else:
        print("\n".join(m.describe() for m in done))
    return 0
