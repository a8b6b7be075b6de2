"""epq.testing as an application's test suite sees it: auto-loaded, no servers, no set-up code."""

from __future__ import annotations

import textwrap

import pytest

APP_TEST = textwrap.dedent(
    """
    import pytest
    from uuid import uuid4

    import epq
    import epq.actors
    from epq.testing import drain

    def test_indexing_runs_the_handler(epq_broker, epq_worker, epq_handlers):
        received = epq_handlers.record("index_endpoint")
        endpoint = uuid4()
        result = epq.QueueService().enqueue_index_endpoint(
            epq.EnqueueIndexEndpointRequest(endpoint_id=endpoint, source=epq.EndpointIndexSource.API)
        )
        drain(epq_broker, epq_worker)
        assert [r.endpoint_id for r in received] == [endpoint]
        assert result.job.state == epq.JobState.AVAILABLE

    def test_each_test_gets_a_fresh_broker(epq_broker):
        assert all(q.qsize() == 0 for q in epq_broker.queues.values())

    def test_a_failing_handler_fails_the_drain(epq_broker, epq_worker, epq_handlers):
        def boom(request):
            raise RuntimeError("handler blew up")
        epq_handlers.register("register_job", boom)
        epq.actors.register_job.send_with_options(
            kwargs={"endpoint_id": str(uuid4()), "job_id": "j", "job_metadata": {}}, backoff_ms=[1]
        )
        with pytest.raises(RuntimeError, match="handler blew up"):
            drain(epq_broker, epq_worker)
    """
)


def test_an_application_suite_runs_on_the_stub_broker_with_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an application's tests that import epq.actors at collection, with no EPQ_BROKER_URL
    monkeypatch.delenv("EPQ_BROKER_URL")
    pytester.makepyfile(test_app=APP_TEST)
    # When pytest runs them (the plugin loads through its entry point)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    # Then they pass without any server
    result.assert_outcomes(passed=3)


APP_HANDLERS = textwrap.dedent(
    """
    import epq

    registered = []

    @epq.handler("register_job")
    def register(request):
        registered.append(request.job_id)
    """
)

APP_TEST_WITH_OWN_HANDLERS = textwrap.dedent(
    """
    import pytest
    from uuid import uuid4

    import epq
    import epq.actors
    from epq.testing import drain

    import app_handlers

    REGISTER = {"endpoint_id": str(uuid4()), "job_id": "j", "job_metadata": {}}

    def test_the_applications_handlers_stay_next_to_the_tests_own(epq_broker, epq_worker, epq_handlers):
        received = epq_handlers.record("index_endpoint")
        epq.actors.register_job.send(**REGISTER)
        epq.actors.index_endpoint.send(endpoint_id=str(uuid4()), source="API")
        drain(epq_broker, epq_worker)
        assert app_handlers.registered == ["j"]
        assert len(received) == 1

    def test_a_test_can_replace_an_applications_handler(epq_broker, epq_worker, epq_handlers):
        received = epq_handlers.record("register_job")
        epq.actors.register_job.send(**REGISTER)
        drain(epq_broker, epq_worker)
        assert [r.job_id for r in received] == ["j"]

    def test_the_replacement_ends_with_its_test(epq_broker, epq_worker):
        app_handlers.registered.clear()
        epq.actors.register_job.send(**REGISTER)
        drain(epq_broker, epq_worker)
        assert app_handlers.registered == ["j"]

    def test_a_handler_that_failed_with_retries_left_fails_the_drain(epq_broker, epq_worker, epq_handlers):
        def boom(request):
            raise RuntimeError("endpoint unreachable")
        epq_handlers.register("register_job", boom)
        result = epq.QueueService().enqueue("register_job", REGISTER)
        with pytest.raises(RuntimeError, match="endpoint unreachable"):
            drain(epq_broker, epq_worker)  # the retry waits 10 s: the drain ends before it
        assert epq.QueueService().get_job(result.job.id).state is epq.JobState.RETRYABLE

    def test_without_fail_fast_the_drain_leaves_the_failure_to_the_test(epq_broker, epq_worker, epq_handlers):
        def boom(request):
            raise RuntimeError("endpoint unreachable")
        epq_handlers.register("register_job", boom)
        result = epq.QueueService().enqueue("register_job", REGISTER)
        drain(epq_broker, epq_worker, fail_fast=False)
        assert epq.QueueService().get_job(result.job.id).state is epq.JobState.RETRYABLE

    def test_a_failure_that_a_retry_mends_passes_the_drain(epq_broker, epq_worker, epq_handlers):
        calls = []
        def flaky(request):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("once")
        epq_handlers.register("register_job", flaky)
        epq.actors.register_job.send_with_options(kwargs=REGISTER, backoff_ms=[1])
        drain(epq_broker, epq_worker)
        assert len(calls) == 2

    def test_epq_handlers_clear_leaves_no_handler(epq_broker, epq_worker, epq_handlers):
        epq_handlers.clear()
        epq.actors.register_job.send(**REGISTER)
        with pytest.raises(epq.HandlerNotFound, match="epq_handlers.register"):
            drain(epq_broker, epq_worker)
    """
)


def test_the_plugins_handler_registry_and_drain_as_an_application_uses_them(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an application with a handler module of its own, imported by its tests
    monkeypatch.delenv("EPQ_BROKER_URL")
    pytester.makepyfile(app_handlers=APP_HANDLERS, test_app=APP_TEST_WITH_OWN_HANDLERS)
    # When its tests run with the plugin
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    # Then its handlers stay registered beside the tests' own, and drain reports failures
    result.assert_outcomes(passed=7)
