"""A worker command's metric files live in a directory of its own under the temporary directory
(``epq.metrics.multiprocess_dir``); the directories of worker commands that are gone are removed
when the next one starts, so that a host restarting its workers does not gather them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from epq import metrics


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_worker_command_removes_the_metric_directories_of_worker_commands_that_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a temporary directory holding the metric files of a worker command that is gone, of
    # one still running (this process), and something else of the same prefix
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # (noted, so that the test's setting is undone)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    gone = tmp_path / f"epq-metrics-{_dead_pid()}"
    gone.mkdir()
    (gone / "counter_1.db").write_bytes(b"x" * 16)
    running = tmp_path / f"epq-metrics-{os.getpid()}"
    running.mkdir()
    other = tmp_path / "epq-metrics-notes"
    other.mkdir()
    # When a worker command starts
    path = metrics.multiprocess_dir(main_pid=os.getppid())
    # Then it has its own directory, the one of the command that is gone is removed, and the
    # others are left as they were
    assert path == tmp_path / f"epq-metrics-{os.getppid()}"
    assert path.is_dir()
    assert not gone.exists()
    assert running.is_dir()
    assert other.is_dir()


def test_a_directory_named_by_the_environment_is_used_and_nothing_else_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = tmp_path / f"epq-metrics-{_dead_pid()}"
    gone.mkdir()
    given = tmp_path / "mine"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    assert metrics.multiprocess_dir(main_pid=os.getppid()) == given
    assert gone.is_dir()
