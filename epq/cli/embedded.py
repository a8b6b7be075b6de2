"""``epq embedded status|start|stop``: the embedded Redis server that ``epq worker`` and ``epq
enqueue`` start when no broker URL is set."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from ..backends import embedded
from ..backends.urls import embedded_path
from ..settings import default_state_dir
from .common import command


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    if not args.path:
        path = default_state_dir() / "redis.db"
    elif "://" in args.path:
        path = embedded_path(args.path)
    else:
        path = Path(args.path).expanduser().absolute()
    pid = embedded.server_pid(path)
    where = f"the embedded Redis for {path}"
    if args.embedded_command == "status":
        if pid is None:
            print(f"{where}: not running")
            return 3
        print(f"{where}: running (pid {pid}, socket {embedded.socket_path(path)})")
        return 0
    if args.embedded_command == "start":
        if pid is not None:
            print(f"{where}: already running (pid {pid})")
            return 0
        embedded.ensure_server(path)
        print(f"started {where} (pid {embedded.server_pid(path)}); stop it with `epq embedded stop`")
        return 0
    if pid is None:
        print(f"no embedded Redis running for {path}")
        return 0
    print(f"stopping {where} (pid {pid}), saving its data...", flush=True)
    started = time.monotonic()
    embedded.stop_server(path)
    took = time.monotonic() - started
    print(f"stopped the embedded Redis in {took:.2f} s; its data stays in {path.parent}")
    return 0
