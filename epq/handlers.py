"""The handler registry: which function runs the jobs of each kind.

    @epq.handler("index_endpoint")
    def index(request: epq.EnqueueIndexEndpointRequest) -> None: ...

Workers import the modules named in ``EPQ_HANDLERS`` when they boot. Handlers must be
idempotent: delivery is at least once.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import ConfigurationError, HandlerAlreadyRegistered
from .kinds import KINDS, get_kind

HandlerFn = Callable[[Any], Any]
F = TypeVar("F", bound=HandlerFn)

_lock = threading.Lock()
_handlers: dict[str, HandlerFn] = {}


def handler(kind: str) -> Callable[[F], F]:
    """Register the decorated function as the handler of ``kind``.

    Registering the same function twice is harmless; a different function for a kind that
    already has one raises :class:`HandlerAlreadyRegistered`.
    """
    get_kind(kind)

    def decorator(fn: F) -> F:
        register(kind, fn)
        return fn

    return decorator


def register(kind: str, fn: HandlerFn, *, replace: bool = False) -> None:
    """Register ``fn`` as the handler of ``kind`` (see :func:`handler`); ``replace`` lets it take
    the place of another handler (tests)."""
    get_kind(kind)
    with _lock:
        current = _handlers.get(kind)
        if current is not None and current is not fn and not replace:
            raise HandlerAlreadyRegistered(
                f"{kind} already has handler {_name(current)}; not registering {_name(fn)}"
            )
        _handlers[kind] = fn


def get_handler(kind: str) -> HandlerFn | None:
    """The handler registered for ``kind``, or None."""
    return _handlers.get(kind)


def missing_kinds() -> list[str]:
    """The kinds that have no handler yet."""
    return [kind for kind in KINDS if kind not in _handlers]


@contextmanager
def isolated_handlers() -> Iterator[dict[str, HandlerFn]]:
    """Run a block that may change the registry, restoring it afterwards (for tests)."""
    with _lock:
        saved = dict(_handlers)
    try:
        yield _handlers
    finally:
        with _lock:
            _handlers.clear()
            _handlers.update(saved)


def unregister_all() -> None:
    """Forget every handler (tests; see :func:`isolated_handlers`)."""
    with _lock:
        _handlers.clear()


def import_handler_modules(modules: Iterable[str]) -> None:
    """Import each module (they register their handlers as a side effect)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"EPQ_HANDLERS: cannot import handler module {name!r}: {exc}") from exc


def _name(fn: HandlerFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
