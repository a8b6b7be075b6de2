"""The Lua scripts of the Redis backend, read from ``lua/*.lua`` beside this module.

A script names the pieces it shares with others on lines ``-- #include lib/<name>.lua`` (a piece
may include others); each piece goes in once, before the lines that use it. ``@NAME@`` stands
for a constant that Python owns too (see ``CONSTANTS``), so that both read one definition.
"""

from __future__ import annotations

import functools
import re
from importlib.resources import files
from typing import Any

from ...options import PRIORITY
from ...priority import BROKER_PRIORITY, DEFAULT_LANE, RABBITMQ_MAX_PRIORITY

_LUA = files(__package__) / "lua"
_INCLUDE = re.compile(r"^-- #include (lib/[a-z_]+\.lua)\n", re.MULTILINE)
_CONSTANT = re.compile(r"@([A-Z_]+)@")
CONSTANTS = {
    "DEFAULT_LANE": str(DEFAULT_LANE),
    "PRIORITY_OPTION": PRIORITY,
    "BROKER_PRIORITY_OPTION": BROKER_PRIORITY,
    "MAX_PRIORITY": str(RABBITMQ_MAX_PRIORITY),
}


@functools.cache
def source(name: str) -> str:
    """The text of script ``name`` (``lua/<name>.lua``), its pieces included."""
    return _CONSTANT.sub(lambda m: CONSTANTS[m.group(1)], _expand(f"{name}.lua", set()))


def _expand(path: str, included: set[str]) -> str:
    def include(match: re.Match[str]) -> str:
        piece = match.group(1)
        if piece in included:
            return ""
        included.add(piece)
        return _expand(piece, included)

    return _INCLUDE.sub(include, (_LUA / path).read_text(encoding="utf-8"))


def names() -> list[str]:
    """Every script's name (the ``.lua`` files beside this module, not the pieces)."""
    return sorted(p.name[: -len(".lua")] for p in _LUA.iterdir() if p.name.endswith(".lua"))


def register(client: Any, name: str) -> Any:
    """Script ``name`` registered on a redis-py client (sent by hash, loaded when missing)."""
    return client.register_script(source(name))


def register_all(client: Any, *names: str) -> dict[str, Any]:
    """Scripts ``names`` registered on a redis-py client, by name."""
    return {name: register(client, name) for name in names}
