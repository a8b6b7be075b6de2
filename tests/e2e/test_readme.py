"""The README's quick start runs as written: its files, its worker command and its enqueues."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def quick_start() -> tuple[dict[str, str], list[str]]:
    """The quick start's files (``# NAME.py`` on a block's first line) and its shell lines."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        first = block.splitlines()[0]
        match = re.match(r"# (\w+\.py)\b", first)
        assert match, f"a quick-start block does not start with its file name: {first!r}"
        files[match.group(1)] = block
    prose = re.sub(r"```.*?```", "", section, flags=re.S)
    shell = [line.split("#", 1)[0].strip() for line in prose.splitlines() if line.startswith("    ")]
    return files, [line for line in shell if line]


def run_line(line: str, cwd: Path, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``VAR=value ... command args`` -> (the variables, the command)."""
    words = shlex.split(line)
    assigned = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        name, _, value = words.pop(0).partition("=")
        assigned[name] = value
    return assigned, words


@pytest.mark.slow
@pytest.mark.embedded
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    # Given the quick start's files, in a directory of their own, and a home for the embedded
    # Redis the quick start uses by default (no EPQ_BROKER_URL)
    files, commands = quick_start()
    assert set(files) == {"handlers.py", "app.py", "send.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
    env.update(XDG_STATE_HOME=str(state), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    worker_line, enqueue_line = commands
    assert worker_line.endswith("&"), worker_line

    # When the worker runs as the README starts it, and the two enqueue scripts after it
    assigned, argv = run_line(worker_line.rstrip("&"), tmp_path, env)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            argv, cwd=tmp_path, env={**env, **assigned}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        printed = []
        for part in enqueue_line.split("&&"):
            assigned, argv = run_line(part, tmp_path, env)
            done = subprocess.run(
                argv, cwd=tmp_path, env={**env, **assigned}, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
            printed.append(done.stdout)

        # Then each script printed its job, and the worker ran both jobs (and nothing else)
        assert "available" in printed[0]
        assert re.fullmatch(r"[0-9a-f-]{36}\n", printed[1])
        deadline = time.monotonic() + 30
        while log.read_text().count("indexing") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.read_text().count("indexing") == 2, log.read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
        subprocess.run(
            [str(BIN / "epq"), "embedded", "stop"], env=env, capture_output=True, timeout=30, check=False
        )


def test_the_testing_example_passes_with_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the README's example of an application's tests
    text = (ROOT / "README.md").read_text()
    section = text.split("## In an application's tests", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(# test_\w+\.py.*?)```", section, flags=re.S)
    monkeypatch.delenv("EPQ_BROKER_URL")
    pytester.makepyfile(test_indexing=block)
    # When pytest runs it, the plugin loading by itself
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    # Then its tests pass
    result.assert_outcomes(passed=len(re.findall(r"^def test_", block, flags=re.M)))
