"""A payload in the worker: upgraded, its unknown fields dropped, validated into its request model.

What a worker does with a job's payload before the handler sees it, in this order:

1. **Upgrades.** The kind's payload upgrades (``@epq.payload_upgrade(kind)``, declared in the
   handler modules) run in the order they were declared, each on the previous one's result, on a
   copy of the payload: the message keeps the payload as it was sent. One that raises, or returns
   something other than a dict, fails the job with :class:`epq.PayloadUpgradeFailed` naming the
   kind and the upgrade: dead-lettered at once, as every payload that cannot be validated is.
2. **Unknown fields.** Fields the request model does not know (a newer producer's, in a rolling
   deploy), at the top level or inside a nested model, are dropped, each logged once per process,
   kind and dotted path (``trigger.extra``); unless the kind is strict
   (``EPQ_STRICT_PAYLOAD_KINDS``): then they stay, and validation refuses them.
3. **Validation** into the kind's model; a payload that fails is :class:`epq.InvalidPayload`
   naming the field.

Callers validate strictly and never upgrade: a payload upgrade is for what producers of other
versions sent, not for the caller's own code.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import InvalidPayload, InvalidRequest, PayloadUpgradeFailed, short_field
from .handlers import get_upgrades, name_of
from .kinds import JobKind
from .models import _Request

logger = logging.getLogger("epq")

#: The (kind, field path) pairs of unknown payload fields already logged by this process; bounded,
#: so that payloads with ever new field names cannot grow it without end.
_unknown_logged: set[tuple[str, str]] = set()
_UNKNOWN_LOGGED_MAX = 1000
_unknown_lock = threading.Lock()


def to_request(kind: JobKind, payload: dict[str, Any], *, strict: bool = False) -> _Request:
    """The request a kind's handler receives for ``payload``, as the module docstring says.

    Raises:
      PayloadUpgradeFailed: an upgrade raised or returned no dict.
      InvalidPayload: the (upgraded) payload does not validate, naming the field.
    """
    payload = upgraded(kind.name, payload)
    if not strict:
        payload = known_fields_only(kind.name, kind.model, payload)
    try:
        return kind.model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidPayload(str(InvalidRequest.from_validation_error(kind.name, exc))) from exc


def upgraded(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` through ``kind``'s payload upgrades, in the order they were declared (the
    payload itself when the kind has none; else a copy: ``payload`` is never changed).

    Raises:
      PayloadUpgradeFailed: an upgrade raised (an ``Exception``: a worker's interrupts pass) or
        returned something other than a dict.
    """
    upgrades = get_upgrades(kind)
    if not upgrades:
        return payload
    current = copy.deepcopy(payload)  # (an upgrade may change what it is given in place)
    for position, upgrade in enumerate(upgrades, 1):
        try:
            result = upgrade(current)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise PayloadUpgradeFailed(kind, name_of(upgrade), position, len(upgrades), problem) from exc
        if not isinstance(result, dict):
            problem = f"it returned {type(result).__name__}, not a dict"
            raise PayloadUpgradeFailed(kind, name_of(upgrade), position, len(upgrades), problem)
        current = result
    return current


def known_fields_only(kind: str, model: type[BaseModel], payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` without the fields ``model`` does not know, at its top level and inside the
    nested models its fields hold (a model, an optional one, a list or a dict of them), each
    logged once per process, kind and dotted path. Only models that forbid unknown fields are
    touched (validation would refuse them); ``payload`` itself is never changed."""
    dropped: list[str] = []
    known = _drop_unknown(model, payload, "", dropped)
    for path in dropped:
        _log_unknown(kind, model, path)
    return known


def _log_unknown(kind: str, model: type[BaseModel], path: str) -> None:
    with _unknown_lock:
        first = (kind, path) not in _unknown_logged and len(_unknown_logged) < _UNKNOWN_LOGGED_MAX
        if first:
            _unknown_logged.add((kind, path))
    if first:
        logger.warning(
            "%s payloads carry field %r, which this worker's %s does not know: ignored (a newer "
            "producer? deploy the workers too; EPQ_STRICT_PAYLOAD_KINDS=%s dead-letters such jobs "
            "instead). Logged once per kind and field.",
            kind,
            short_field(path),
            model.__name__,
            kind,
        )


# A way down to nested models from a field: ("model", M), or ("items", way) for each item of a
# list, or ("values", way) for each value of a dict.
_Way = tuple[str, Any]


def _drop_unknown(
    model: type[BaseModel], data: dict[str, Any], prefix: str, dropped: list[str]
) -> dict[str, Any]:
    known, nested = _fields_of(model)
    unknown = [name for name in data if name not in known] if known is not None else []
    ways = [(name, way) for name, way in nested if name in data]
    if not unknown and not ways:
        return data
    dropped += (prefix + name for name in unknown)
    out = {name: value for name, value in data.items() if name not in unknown}
    for name, way in ways:
        out[name] = _follow(way, out[name], prefix + name, dropped)
    return out


def _follow(way: _Way, value: Any, path: str, dropped: list[str]) -> Any:
    how, inner = way
    if how == "model":
        return _drop_unknown(inner, value, path + ".", dropped) if isinstance(value, dict) else value
    if how == "items" and isinstance(value, list):
        return [_follow(inner, item, path + "[]", dropped) for item in value]
    if how == "values" and isinstance(value, dict):
        return {key: _follow(inner, item, path + ".*", dropped) for key, item in value.items()}
    return value


@functools.cache
def _fields_of(model: type[BaseModel]) -> tuple[frozenset[str] | None, tuple[tuple[str, _Way], ...]]:
    """The names ``model`` knows (None: it keeps or ignores unknown ones itself), and the ways down
    to the nested models of its fields."""
    names: set[str] = set()
    nested = []
    for name, field in model.model_fields.items():
        names.add(name)
        if isinstance(field.alias, str):
            names.add(field.alias)
        way = _way(field.annotation)
        if way is not None:
            nested.append((name, way))
    known = frozenset(names) if model.model_config.get("extra") == "forbid" else None
    return known, tuple(nested)


def _way(annotation: Any) -> _Way | None:
    """How to reach the models inside a value of type ``annotation``, if any."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        return _way(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("model", annotation)
    if origin is Union or origin is types.UnionType:
        # an optional model; a union of several types is left to validation to choose
        others = [arg for arg in args if arg is not type(None)]
        return _way(others[0]) if len(others) == 1 else None
    if origin in (list, Sequence) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        inner = _way(args[0]) if args else None
        return ("items", inner) if inner is not None else None
    if origin in (dict, Mapping) and len(args) == 2:
        inner = _way(args[1])
        return ("values", inner) if inner is not None else None
    return None
