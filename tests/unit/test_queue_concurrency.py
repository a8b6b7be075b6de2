"""The rules of per-queue concurrency (epq.concurrency): a queue's consumer prefetches at most its
budget; and `epq worker` sizes dramatiq's threads to the budgets of the queues it serves
(EPQ_QUEUE_CONCURRENCY), unless it is told how many."""

from __future__ import annotations

import sys

import pytest

from epq import cli
from epq.cli import worker
from epq.concurrency import capped_prefetch, queue_budgets
from epq.settings import reset_settings


def test_a_queue_consumer_prefetches_at_most_the_queues_budget() -> None:
    budgets = {"default": 2, "events": 20}
    assert capped_prefetch(budgets, "default", 16) == 2
    assert capped_prefetch(budgets, "events", 16) == 16  # (Dramatiq's is lower: it stays)
    # Dramatiq's delay queues only hold messages until their time: not capped
    assert capped_prefetch(budgets, "default.DQ", 8000) == 8000
    assert capped_prefetch(budgets, "reports", 16) == 16


def test_budgets_come_from_the_setting_then_the_go_package_then_10() -> None:
    assert queue_budgets(["default", "maintenance", "bulk"], {"default": 3}) == {
        "default": 3,
        "maintenance": 2,
        "bulk": 10,
    }


def _command(*argv: str) -> list[str]:
    args, _ = cli._parser().parse_known_args(["worker", *argv])
    return worker.worker_command(args)


def _threads(cmd: list[str]) -> str | None:
    return cmd[cmd.index("--threads") + 1] if "--threads" in cmd else None


def test_threads_are_the_sum_of_the_budgets_of_every_queue_served() -> None:
    cmd = _command()
    assert cmd[:4] == [sys.executable, "-m", "dramatiq", "epq.actors"]
    assert (
        _threads(cmd) == "37"
    )  # the Go package's budgets: default 10, execution 5, events 20, maintenance 2


def test_threads_fit_the_queues_given_and_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _threads(_command("-Q", "default", "events")) == "30"
    monkeypatch.setenv("EPQ_QUEUE_CONCURRENCY", "default=2,maintenance=1")
    reset_settings()
    assert _threads(_command("-Q", "default", "events")) == "22"
    assert _threads(_command("-Q", "maintenance")) == "1"


def test_a_queue_without_a_budget_of_its_own_counts_10(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_QUEUES", "default,bulk")
    assert _threads(_command()) == "20"


def test_threads_given_win() -> None:
    assert _threads(_command("--threads", "4")) == "4"
    assert _threads(_command("-t", "64", "-Q", "maintenance")) == "64"


@pytest.mark.parametrize("given", [["--threads", "3"], ["-t", "3"], ["-t3"], ["--threads=3"], ["--thr", "3"]])
def test_threads_given_to_dramatiq_after_the_separator_are_left_to_it(given: list[str]) -> None:
    cmd = _command("--", "--verbose", *given)
    assert cmd[-len(given) - 1 :] == ["--verbose", *given]
    assert "--threads" not in cmd[: -len(given)]  # epq adds none of its own
