"""The handler registry: which function runs the jobs of each kind, and which functions upgrade
its payloads first.

    @epq.handler("index_endpoint")
    def index(request: epq.EnqueueIndexEndpointRequest) -> None: ...

    @epq.payload_upgrade("register_job")
    def metadata_renamed(payload: dict) -> dict: ...

Workers import the modules named in ``EPQ_HANDLERS`` when they boot. Handlers must be
idempotent: delivery is at least once. What a worker does with the upgrades is in
:mod:`epq.payloads`.
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
#: A payload upgrade: a payload as an older producer sent it -> the payload in today's shape.
UpgradeFn = Callable[[dict[str, Any]], dict[str, Any]]
U = TypeVar("U", bound=UpgradeFn)

_lock = threading.Lock()
_handlers: dict[str, HandlerFn] = {}
#: kind -> its payload upgrades, in the order they were declared (replaced, never changed in
#: place, so that a worker thread reads it without the lock)
_upgrades: dict[str, tuple[UpgradeFn, ...]] = {}


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
                f"{kind} already has handler {name_of(current)}; not registering {name_of(fn)}"
            )
        _handlers[kind] = fn


def get_handler(kind: str) -> HandlerFn | None:
    """The handler registered for ``kind``, or None."""
    return _handlers.get(kind)


def payload_upgrade(kind: str) -> Callable[[U], U]:
    """Declare the decorated function an upgrade of ``kind``'s payloads: a worker calls it with
    the payload as the message carries it (a dict of JSON values) and validates what it returns.

    A kind's upgrades run in the order they were declared, each on the previous one's result,
    before the unknown fields are dropped and the payload is validated. An upgrade recognises the
    old shape it converts (a field's old name, a value's old type) and returns any other payload
    unchanged: payloads carry no version, so it also sees payloads already in today's shape.
    Declaring the same function again is harmless.
    """
    get_kind(kind)

    def decorator(fn: U) -> U:
        register_upgrade(kind, fn)
        return fn

    return decorator


def register_upgrade(kind: str, fn: UpgradeFn) -> None:
    """Declare ``fn`` an upgrade of ``kind``'s payloads (see :func:`payload_upgrade`)."""
    get_kind(kind)
    if not callable(fn):
        raise TypeError(f"a payload upgrade of {kind} must be a function dict -> dict, not {fn!r}")
    with _lock:
        declared = _upgrades.get(kind, ())
        if fn not in declared:
            _upgrades[kind] = (*declared, fn)


def get_upgrades(kind: str) -> tuple[UpgradeFn, ...]:
    """``kind``'s payload upgrades, in the order they run."""
    return _upgrades.get(kind, ())


def missing_kinds() -> list[str]:
    """The kinds that have no handler yet."""
    return [kind for kind in KINDS if kind not in _handlers]


@contextmanager
def isolated_handlers() -> Iterator[dict[str, HandlerFn]]:
    """Run a block that may change the registry (handlers and payload upgrades), restoring it
    afterwards (for tests)."""
    with _lock:
        saved = dict(_handlers)
        saved_upgrades = dict(_upgrades)
    try:
        yield _handlers
    finally:
        with _lock:
            _handlers.clear()
            _handlers.update(saved)
            _upgrades.clear()
            _upgrades.update(saved_upgrades)


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


def name_of(fn: Callable[..., Any]) -> str:
    """A handler's or an upgrade's name as messages show it: ``module.qualname``."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
