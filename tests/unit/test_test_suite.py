"""The test suite's own rules.

- Tests use epq through its public modules: no test module (nor code a test runs in a subprocess)
  imports a private module or name of epq (``epq._runtime``, ``from epq import _messages``,
  ``from epq.bulk import _x``); what tests need of epq's internals goes through ``epq.testing``.
- Test modules live in ``contract/``, ``redis/``, ``rabbitmq/``, ``unit/`` or ``e2e/``; helpers
  and handler modules in ``support/``.
- The handler modules worker subprocesses are told to import exist.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from tests.support import workers

TESTS = Path(__file__).resolve().parents[1]
TEST_DIRECTORIES = {"contract", "redis", "rabbitmq", "unit", "e2e"}

#: Modules still importing a private module of epq, and why they may for now.
PRIVATE_IMPORTS_ALLOWED: dict[str, str] = {}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each import of a private module or name of epq in ``source``, and in
    the Python code of its string constants (code run with ``python -c`` or written by pytester)."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "epq" and any(_private(part) for part in parts[1:]):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            parts = node.module.split(".")
            if parts[0] != "epq":
                continue
            if any(_private(part) for part in parts[1:]):
                found.append((node.lineno, f"from {node.module} import ..."))
            found += [
                (node.lineno, f"from {node.module} import {alias.name}")
                for alias in node.names
                if _private(alias.name)
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            try:
                inner = private_imports(node.value)
            except SyntaxError:
                continue  # prose, not code
            found += [(node.lineno, f"{what} (in a string)") for _, what in inner]
    return found


def _test_sources() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def test_the_checker_finds_private_imports_of_epq() -> None:
    source = """
import epq._runtime
import epq._messages as m
from epq import _runtime, actors
from epq._actor import EpqActor
from epq.backends import _private_module
from epq.bulk import _prepare
CODE = "import epq, epq._runtime as r; r.current()"
"""
    assert [what for _, what in private_imports(source)] == [
        "import epq._runtime",
        "import epq._messages",
        "from epq import _runtime",
        "from epq._actor import ...",
        "from epq.backends import _private_module",
        "from epq.bulk import _prepare",
        "import epq._runtime (in a string)",
    ]


def test_the_checker_leaves_public_and_foreign_names_alone() -> None:
    source = '''
"""A docstring naming epq._runtime, which is prose: nothing is imported."""
import epq
import epq.actors
from epq import __version__, testing
from epq.testing import backend
from dramatiq.worker import _WorkQueueItem
from . import _local
CODE = "import epq; print(epq.__version__)"
'''
    assert private_imports(source) == []


def test_no_test_imports_a_private_module_of_epq() -> None:
    offenders = {}
    for path in _test_sources():
        if path == Path(__file__).resolve():
            continue  # the checker's own samples
        name = path.relative_to(TESTS).as_posix()
        found = private_imports(path.read_text(encoding="utf-8"))
        if found and name not in PRIVATE_IMPORTS_ALLOWED:
            offenders[name] = found
    assert offenders == {}, "use epq.testing (install, reset, current_broker, backend, messages)"


def test_the_modules_allowed_private_imports_exist() -> None:
    # an exemption outlives neither its module nor a move of it
    for name in PRIVATE_IMPORTS_ALLOWED:
        assert (TESTS / name).is_file(), name


def test_test_modules_live_in_their_directories() -> None:
    misplaced = [
        path.relative_to(TESTS).as_posix()
        for path in _test_sources()
        if path.name.startswith("test_") and path.relative_to(TESTS).parts[0] not in TEST_DIRECTORIES
    ]
    assert misplaced == []
    for directory in TEST_DIRECTORIES:
        # a package, so that modules of the same name in two directories do not collide
        assert (TESTS / directory / "__init__.py").is_file(), directory


@pytest.mark.parametrize(
    "module",
    [workers.E2E_HANDLERS, workers.HOLD_HANDLERS, workers.PRIORITY_HANDLERS, workers.CONCURRENCY_HANDLERS],
)
def test_the_handler_modules_named_to_worker_subprocesses_exist(module: str) -> None:
    assert importlib.util.find_spec(module) is not None, module
