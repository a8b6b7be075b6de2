"""The broker a command names: ``--broker-url``, else ``EPQ_BROKER_URL``, else the embedded Redis."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .. import _runtime
from ..backends import embedded
from ..backends.base import display_url
from ..backends.urls import EMBEDDED_SCHEME, embedded_path, mask_url, scheme_of
from ..errors import BrokerUnavailable
from ..settings import get_settings

if TYPE_CHECKING:
    import dramatiq


def open_broker(args: argparse.Namespace, *, may_start_embedded: bool) -> dramatiq.Broker:
    """Set epq up on the broker the command names (``--broker-url``, else ``EPQ_BROKER_URL``,
    else the embedded Redis) and say on stderr which one it is."""
    broker, line = connect(args, may_start_embedded=may_start_embedded)
    print(line, file=sys.stderr, flush=True)
    return broker


def connect(args: argparse.Namespace, *, may_start_embedded: bool) -> tuple[dramatiq.Broker, str]:
    """Set epq up on the broker the command names; return it and the line that says which it is.

    With ``may_start_embedded`` false (operator commands), an embedded Redis that is not
    running is an error instead of being started: a fresh one would hold no jobs, and the
    command would quietly report on the wrong broker.
    """
    url = getattr(args, "broker_url", None) or get_settings().broker_url
    from_default = url is None
    url = url or _runtime.default_broker_url()
    note = ""
    if scheme_of(url) == EMBEDDED_SCHEME:
        path = embedded_path(url)
        running = embedded.server_pid(path) is not None
        if not running and not may_start_embedded:
            where = "the embedded Redis"
            if from_default:
                where = "EPQ_BROKER_URL is not set and " + where
            raise BrokerUnavailable(
                f"{where} ({path}) is not running: set EPQ_BROKER_URL (or --broker-url) to the "
                "broker your workers use, or start the embedded one (`epq worker` or `epq embedded start`)"
            )
        note = " (embedded Redis; " + ("started now; " if not running else "")
        note += "it keeps running until `epq embedded stop`)"
    try:
        broker = _runtime.setup(url)
    except BrokerUnavailable as exc:
        raise BrokerUnavailable(
            f"{exc}; check that the server runs and that EPQ_BROKER_URL (or --broker-url) and "
            "EPQ_STATE_URL name it"
        ) from exc
    runtime = _runtime.current()
    line = f"epq: broker {display_url(broker)}{note}"
    if runtime is not None and runtime.state_url:
        line += f", state {mask_url(runtime.state_url)}"
    return broker, line
