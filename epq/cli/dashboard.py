"""``epq dashboard``: serve the web dashboard (``epq.dashboard``) with uvicorn."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import ConfigurationError
from ..service import QueueService
from ..settings import get_settings
from ._broker import open_broker
from .common import command

#: The modules ``epq[dashboard]`` brings (the import names of its distributions).
EXTRA_MODULES = frozenset({"starlette", "jinja2", "uvicorn", "multipart", "python_multipart"})

try:
    import uvicorn

    from .. import dashboard
except ModuleNotFoundError as exc:  # epq[dashboard] is not installed
    if (exc.name or "").split(".")[0] not in EXTRA_MODULES:
        raise
    MISSING: str | None = (exc.name or "").split(".")[0]
else:
    MISSING = None


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    if MISSING is not None:
        raise ConfigurationError(
            f"epq dashboard needs the dashboard extra ({MISSING} is not installed): "
            "pip install 'epq[dashboard]'"
        )
    settings = get_settings()
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    password = settings.dashboard_password.get_secret_value() if settings.dashboard_password else None
    user = settings.dashboard_user
    dashboard.check_binding(args.host, token=token, user=user, password=password)
    broker = open_broker(args, may_start_embedded=False)
    app = dashboard.create_app(QueueService(broker), token=token, user=user, password=password)
    where = f"[{args.host}]" if ":" in args.host else args.host
    login = "a token or basic auth asked" if token or user else "no login: loopback only"
    print(f"epq: dashboard on http://{where}:{args.port}/ ({login})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", server_header=False)
    return 0
