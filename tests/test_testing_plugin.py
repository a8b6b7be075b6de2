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
