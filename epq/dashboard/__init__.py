"""``epq dashboard``: a web page over the control plane (``QueueService``), for operators.

Server-rendered HTML (Starlette, Jinja2 templates, plain forms, no JavaScript): the queues (depth
per priority, lag, paused; pause and resume), the jobs (``list_jobs``' filters, page after page),
a job's detail (args, errors with tracebacks, output, timeline; cancel, retry, delete) and the
dead jobs (retry, delete). ``create_app`` builds the ASGI app, so tests run it in-process;
``epq.cli.dashboard`` serves it with uvicorn. Needs ``pip install epq[dashboard]``.

Security (``docs/decisions.md``, decision 69):

- Access: without credentials it answers only requests for a loopback name (``Host``), so that a
  page elsewhere cannot reach it through DNS rebinding; ``check_binding`` refuses an address other
  than loopback then. With a token or basic-auth credentials set, every request but the login
  page and the stylesheet needs them: an ``Authorization: Bearer TOKEN`` or ``Basic`` header, or
  the session cookie the login form sets (HttpOnly, SameSite=Strict, signed with a key made at
  start-up). Every comparison is in constant time.
- Actions are POSTs; GETs change nothing. Each form carries a CSRF token (an HMAC of a random
  cookie of the browser's, SameSite=Strict), and the request's ``Origin`` (else its ``Referer``)
  must be the dashboard's own; a POST without one of them, or from elsewhere, is refused (403)
  before anything is done.
- No page shows a credential: the broker and state store URLs are shown masked
  (``epq.backends.urls.mask_url``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from dramatiq.errors import BrokerConnectionError
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import _runtime
from ..backends.base import display_url
from ..backends.errors import STORE_ERRORS
from ..backends.urls import mask_url
from ..errors import ConfigurationError, DuplicateJob, EpqError, InvalidPayload, JobNotFound, describe_error
from ..models import JobRecord, JobState
from ..priority import LANES
from ..records import NOT_STARTED
from ..service import QueueService

HERE = Path(__file__).resolve().parent
#: The cookies the dashboard sets (all HttpOnly and SameSite=Strict).
SESSION_COOKIE = "epq_session"
CSRF_COOKIE = "epq_csrf"
FLASH_COOKIE = "epq_flash"
#: How long a login lasts.
SESSION_TTL_S = 12 * 3600
#: The filters of the job list (``QueueService.list_jobs``').
FILTERS = ("state", "kind", "queue", "priority", "endpoint_id")
#: Jobs per page of the job lists.
PAGE_SIZE = 50
#: States a job can be cancelled in (not started, or running).
CANCELLABLE = (*NOT_STARTED, "running")
#: Sent with every response: no framing, no scripts, forms post only here, nothing cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to listen on) is this machine's loopback only."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_credentials(token: str | None, user: str | None, password: str | None) -> None:
    """Refuse credentials that cannot be used: an empty one, a user without a password or a
    password without a user (``ConfigurationError`` naming the setting)."""
    for name, value in (("TOKEN", token), ("USER", user), ("PASSWORD", password)):
        if value is not None and not value:
            raise ConfigurationError(f"EPQ_DASHBOARD_{name} is empty: set a value or unset it")
    if (user is None) != (password is None):
        missing = "EPQ_DASHBOARD_PASSWORD" if password is None else "EPQ_DASHBOARD_USER"
        raise ConfigurationError(f"{missing} is not set: basic auth needs both a user and a password")


def check_binding(host: str, *, token: str | None, user: str | None, password: str | None) -> None:
    """Refuse (``ConfigurationError``) to serve on an address other than loopback without a token
    or basic-auth credentials, or with credentials that cannot be used."""
    check_credentials(token, user, password)
    if not is_loopback(host) and token is None and user is None:
        raise ConfigurationError(
            f"the dashboard does not listen on {host} without credentials: set EPQ_DASHBOARD_TOKEN, or "
            "EPQ_DASHBOARD_USER and EPQ_DASHBOARD_PASSWORD (or listen on 127.0.0.1)"
        )


# ---- access --------------------------------------------------------------------------------------


class _Keys:
    """The credentials asked for, and this process's signing key (sessions and CSRF tokens)."""

    def __init__(self, token: str | None, user: str | None, password: str | None) -> None:
        check_credentials(token, user, password)
        self.token = token
        self.user = user
        self.password = password
        self.secret = secrets.token_bytes(32)

    @property
    def on(self) -> bool:
        return self.token is not None or self.user is not None

    def sign(self, purpose: str, value: str) -> str:
        return hmac.new(self.secret, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def user_ok(self, user: str, password: str) -> bool:
        if self.user is None or self.password is None:
            return False
        # both compared whatever the first gives, so the time says nothing of which was wrong
        same_user = hmac.compare_digest(user.encode(), self.user.encode())
        same_password = hmac.compare_digest(password.encode(), self.password.encode())
        return same_user & same_password

    def header_ok(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return self.token_ok(value.strip())
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return bool(sep) and self.user_ok(user, password)
        return False

    def new_session(self) -> str:
        expires = str(int(time.time()) + SESSION_TTL_S)
        return f"{expires}.{self.sign('session', expires)}"

    def session_ok(self, cookie: str) -> bool:
        expires, _, signature = cookie.partition(".")
        expected = self.sign("session", expires).encode()
        if not (expires.isdigit() and hmac.compare_digest(signature.encode(), expected)):
            return False
        return int(expires) > time.time()

    def allows(self, request: Request) -> bool:
        if not self.on:
            return True
        header = request.headers.get("authorization")
        if header is not None and self.header_ok(header):
            return True
        cookie = request.cookies.get(SESSION_COOKIE)
        return cookie is not None and self.session_ok(cookie)


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}".lower()


def same_origin(request: Request) -> bool:
    """Whether a POST comes from the dashboard's own pages: its ``Origin`` header, else its
    ``Referer``, names the dashboard's own origin. A request with neither is refused."""
    origin = request.headers.get("origin")
    if origin is not None:
        return origin.lower() == _own_origin(request)
    referer = request.headers.get("referer")
    if referer:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}".lower() == _own_origin(request)
    return False


def _loopback_host(request: Request) -> bool:
    """Whether the request's ``Host`` names this machine's loopback (``127.0.0.1:8811``,
    ``localhost``, ``[::1]:8811``)."""
    try:
        host = urlsplit("//" + request.headers.get("host", "")).hostname
    except ValueError:
        return False
    return host is not None and is_loopback(host)


def _local_path(value: object, default: str) -> str:
    """``value`` if it is a path of this site (where to go back to after an action), else
    ``default``: never another host's address."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


class _Guard(BaseHTTPMiddleware):
    """Every request: the access check, the browser's CSRF cookie, the security headers."""

    def __init__(self, app: Any, keys: _Keys) -> None:
        super().__init__(app)
        self.keys = keys

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        cookie = request.cookies.get(CSRF_COOKIE)
        fresh = cookie is None or len(cookie) != 43
        request.state.csrf_cookie = secrets.token_urlsafe(32) if fresh else cookie
        request.state.keys = self.keys
        path = request.url.path
        if not self.keys.on and not _loopback_host(request):
            # without credentials only a loopback name may be asked for: a page whose own name
            # was made to resolve to 127.0.0.1 (DNS rebinding) must not read or post here
            response: Response = PlainTextResponse("this dashboard answers to loopback names only", 400)
        elif path.startswith("/static/") or path == "/login" or self.keys.allows(request):
            response = await call_next(request)
        elif request.method in ("GET", "HEAD"):
            here = path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse("/login?" + urlencode({"next": here}), status_code=303)
        else:
            response = PlainTextResponse("login required", status_code=401)
        if fresh:
            _set_cookie(request, response, CSRF_COOKIE, request.state.csrf_cookie, None)
        response.headers.update(SECURITY_HEADERS)
        return response


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _csrf_token(request: Request) -> str:
    keys: _Keys = request.state.keys
    return keys.sign("csrf", request.state.csrf_cookie)


async def _checked_form(request: Request) -> FormData | None:
    """The POST's form if it came from the dashboard's own page (origin and CSRF token), else None."""
    form = await request.form()
    given = form.get("csrf_token")
    if not same_origin(request) or not isinstance(given, str) or request.cookies.get(CSRF_COOKIE) is None:
        return None
    return form if hmac.compare_digest(given.encode(), _csrf_token(request).encode()) else None


_REFUSED = "refused: this form did not come from the dashboard's own page (reload it and try again)"


# ---- rendering -----------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 3600 else f"{seconds / 3600:.1f}h"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, seconds=_seconds, pretty=_pretty)
    return env


class _Pages:
    """The dashboard's routes over one ``QueueService``."""

    def __init__(self, service: QueueService | None, keys: _Keys) -> None:
        self._service = service
        self.keys = keys
        self.env = _environment()

    @property
    def service(self) -> QueueService:
        if self._service is None:
            self._service = QueueService()
        return self._service

    def _where(self) -> str:
        """The broker (and state store) the dashboard reads, credentials masked."""
        text = f"broker {display_url(self.service.broker)}"
        runtime = _runtime.current()
        if runtime is not None and runtime.state_url:
            text += f", state {mask_url(runtime.state_url)}"
        return text

    async def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        flash = request.cookies.get(FLASH_COOKIE)
        kind, _, text = unquote(flash).partition(":") if flash else ("", "", "")
        where = await run_in_threadpool(self._where)
        page = self.env.get_template(name).render(
            request=request,
            csrf_token=_csrf_token(request),
            logged_in=request.cookies.get(SESSION_COOKIE) is not None and self.keys.on,
            where=where,
            flash={"kind": kind, "text": text} if text else None,
            here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            **context,
        )
        response = HTMLResponse(page, status_code=status)
        if flash:
            response.delete_cookie(FLASH_COOKIE, path="/")
        return response

    @staticmethod
    def done(request: Request, form: FormData, default: str, kind: str, text: str) -> Response:
        """Back to the page the form was on (``back``), with a short message."""
        response = RedirectResponse(_local_path(form.get("back"), default), status_code=303)
        _set_cookie(request, response, FLASH_COOKIE, quote(f"{kind}:{text}"[:300]), 60)
        return response

    # ---- pages ----

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/queues", status_code=303)

    async def queues(self, request: Request) -> Response:
        infos = await run_in_threadpool(self.service.queues)
        return await self.render(request, "queues.html", queues=infos, lanes=LANES, nav="queues")

    async def jobs(self, request: Request) -> Response:
        query = request.query_params
        shown = {
            name: query.get(name, "").strip()
            for name in ("state", "kind", "queue", "priority", "endpoint_id")
        }
        order = query.get("order") or "newest"
        cursor = query.get("cursor") or None
        kept = {k: v for k, v in {**shown, "order": order}.items() if v}
        error = None
        jobs: list[JobRecord] = []
        next_url = None
        try:
            filters: dict[str, Any] = {name: value or None for name, value in shown.items()}
            if filters["priority"] is not None:
                try:
                    filters["priority"] = int(filters["priority"])
                except ValueError:
                    raise ValueError(f"priority: 1, 2, 3 or 4, not {filters['priority']!r}") from None
            page = await run_in_threadpool(
                lambda: self.service.list_jobs(**filters, order=order, cursor=cursor, limit=PAGE_SIZE)
            )
            jobs = page.jobs
            if page.next_cursor is not None:
                next_url = "/jobs?" + urlencode({**kept, "cursor": page.next_cursor})
        except ValueError as exc:
            error = str(exc)
        states = [s.value for s in JobState if s is not JobState.PENDING]
        return await self.render(
            request,
            "jobs.html",
            status=400 if error else 200,
            nav="jobs",
            jobs=jobs,
            shown=shown,
            order=order,
            states=states,
            error=error,
            next_url=next_url,
            first_url=None if cursor is None else "/jobs?" + urlencode(kept),
        )

    async def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        record = await run_in_threadpool(self.service.get_job, job_id)
        if record is None or record.state is JobState.PENDING:
            return await self.render(request, "missing.html", status=404, nav="jobs", job_id=job_id)
        return await self.render(
            request,
            "job.html",
            nav="jobs",
            job=record,
            cancellable=record.state.value in CANCELLABLE,
            retryable=record.state is JobState.DISCARDED,
        )

    async def dead(self, request: Request) -> Response:
        cursor = request.query_params.get("cursor") or None
        error = None
        jobs: list[JobRecord] = []
        next_url = None
        try:
            page = await run_in_threadpool(
                lambda: self.service.list_jobs(state="discarded", cursor=cursor, limit=PAGE_SIZE)
            )
            jobs = page.jobs
            if page.next_cursor is not None:
                next_url = "/dead?" + urlencode({"cursor": page.next_cursor})
        except ValueError as exc:
            error = str(exc)
        return await self.render(
            request,
            "dead.html",
            status=400 if error else 200,
            nav="dead",
            jobs=jobs,
            error=error,
            next_url=next_url,
            first_url=None if cursor is None else "/dead",
        )

    # ---- actions ----

    async def queue_action(self, request: Request) -> Response:
        form = await _checked_form(request)
        if form is None:
            return PlainTextResponse(_REFUSED, status_code=403)
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in ("pause", "resume"):
            return PlainTextResponse("not found", status_code=404)
        call = self.service.pause_queue if action == "pause" else self.service.resume_queue
        try:
            changed = await run_in_threadpool(call, name)
        except EpqError as exc:
            return self.done(request, form, "/queues", "error", str(exc))
        if action == "pause":
            text = f"queue {name} paused" if changed else f"queue {name} was paused already"
        else:
            text = f"queue {name} resumed" if changed else f"queue {name} was not paused"
        return self.done(request, form, "/queues", "ok", text)

    async def job_action(self, request: Request) -> Response:
        form = await _checked_form(request)
        if form is None:
            return PlainTextResponse(_REFUSED, status_code=403)
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        if action not in ("cancel", "retry", "delete"):
            return PlainTextResponse("not found", status_code=404)
        back = f"/jobs/{quote(job_id)}"
        try:
            if action == "cancel":
                record = await run_in_threadpool(self.service.cancel_job, job_id)
                if record.state is JobState.RUNNING:
                    text = f"job {job_id}: its worker was asked to stop it"
                else:
                    text = f"job {job_id} is {record.state.value}"
            elif action == "retry":
                record = await run_in_threadpool(self.service.retry_dead, job_id)
                text = f"job {job_id} is {record.state.value}"
            else:
                await run_in_threadpool(self.service.delete_job, job_id)
                text, back = f"job {job_id} deleted", "/jobs"
        except JobNotFound:
            return self.done(request, form, "/jobs", "error", f"no job {job_id} (expired or deleted)")
        except (DuplicateJob, InvalidPayload) as exc:
            return self.done(request, form, back, "error", f"job {job_id} stays dead: {exc}")
        return self.done(request, form, back, "ok", text)

    # ---- login ----

    async def login(self, request: Request) -> Response:
        target = _local_path(request.query_params.get("next"), "/queues")
        if request.method == "GET":
            if not self.keys.on:
                return RedirectResponse(target, status_code=303)
            return await self.login_page(request, target, None, 200)
        form = await _checked_form(request)
        if form is None:
            return PlainTextResponse(_REFUSED, status_code=403)
        target = _local_path(form.get("next"), "/queues")
        token, user, password = (str(form.get(name) or "") for name in ("token", "user", "password"))
        if (token and self.keys.token_ok(token)) or (user and self.keys.user_ok(user, password)):
            response = RedirectResponse(target, status_code=303)
            _set_cookie(request, response, SESSION_COOKIE, self.keys.new_session(), SESSION_TTL_S)
            return response
        return await self.login_page(request, target, "wrong credentials", 401)

    async def login_page(self, request: Request, target: str, error: str | None, status: int) -> Response:
        page = self.env.get_template("login.html").render(
            csrf_token=_csrf_token(request),
            next=target,
            error=error,
            token=self.keys.token is not None,
            basic=self.keys.user is not None,
        )
        return HTMLResponse(page, status_code=status)

    async def logout(self, request: Request) -> Response:
        form = await _checked_form(request)
        if form is None:
            return PlainTextResponse(_REFUSED, status_code=403)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def failed(self, request: Request, exc: Exception) -> Response:
        """The broker or state store failed, or cannot be reached: a page that says so (503)."""
        page = self.env.get_template("unavailable.html").render(text=describe_error(exc))
        return HTMLResponse(page, status_code=503)


def create_app(
    service: QueueService | None = None,
    *,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
) -> Starlette:
    """The dashboard as an ASGI app over ``service`` (by default a ``QueueService`` on the broker
    ``epq.setup()`` builds, made at the first request).

    ``token``, or ``user`` and ``password``: what every request must give (a bearer token, basic
    auth, or the login form's session cookie); with none, no login is asked (loopback only: see
    :func:`check_binding`).

    Raises:
      ConfigurationError: an empty credential, or a user without a password (or the reverse).
    """
    keys = _Keys(token, user, password)
    pages = _Pages(service, keys)
    routes = [
        Route("/", pages.home),
        Route("/queues", pages.queues),
        Route("/queues/{name}/{action:str}", pages.queue_action, methods=["POST"]),
        Route("/jobs", pages.jobs),
        Route("/jobs/{job_id}", pages.job),
        Route("/jobs/{job_id}/{action:str}", pages.job_action, methods=["POST"]),
        Route("/dead", pages.dead),
        Route("/login", pages.login, methods=["GET", "POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    handlers: Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        error: pages.failed for error in (EpqError, BrokerConnectionError, *STORE_ERRORS)
    }
    return Starlette(
        routes=routes, middleware=[Middleware(_Guard, keys=keys)], exception_handlers=dict(handlers)
    )
