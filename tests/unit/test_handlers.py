"""The handler registry and EPQ_HANDLERS."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import dramatiq
import pytest

import epq
from epq import handlers
from epq.testing import HandlerRegistry, install


def test_handler_decorator_registers_and_returns_the_function(epq_handlers: HandlerRegistry) -> None:
    @epq.handler("register_job")
    def fn(request: epq.RegisterJobRequest) -> None: ...

    assert handlers.get_handler("register_job") is fn
    epq.handler("register_job")(fn)  # the same function again is harmless


def test_a_second_handler_for_a_kind_is_refused(epq_handlers: HandlerRegistry) -> None:
    epq.handler("register_job")(lambda r: None)
    with pytest.raises(epq.HandlerAlreadyRegistered, match="register_job"):
        epq.handler("register_job")(lambda r: None)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(KeyError, match="register_jobs"):
        epq.handler("register_jobs")


def test_worker_boot_imports_epq_handlers_warns_about_missing_kinds_and_names_upgrades(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    epq_handlers: HandlerRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a module that registers one handler, named in EPQ_HANDLERS
    (tmp_path / "app_handlers_boot.py").write_text(
        textwrap.dedent("""
        import epq
        @epq.handler("index_endpoint")
        def index(request):
            pass
        @epq.payload_upgrade("index_endpoint")
        def reason_was_why(payload):
            return payload
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("EPQ_HANDLERS", "app_handlers_boot")
    broker = install("stub://")
    # When a worker boots
    with caplog.at_level(logging.INFO, logger="epq"):
        worker = dramatiq.Worker(broker, worker_timeout=50)
        worker.start()
        worker.stop()
    sys.modules.pop("app_handlers_boot", None)
    # Then the module was imported, the kinds without handlers were named, and so were upgrades
    assert handlers.get_handler("index_endpoint") is not None
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "register_job" in warning
    assert "index_endpoint" not in warning.split("No handler registered for")[1].split(":")[0]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "index_endpoint payloads are upgraded by app_handlers_boot.reason_was_why, in this order" in info


def test_a_handler_module_that_cannot_be_imported_is_a_clear_error() -> None:
    with pytest.raises(epq.ConfigurationError, match="no_such_module_here"):
        handlers.import_handler_modules(["no_such_module_here"])
