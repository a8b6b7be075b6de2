"""The dashboard in-process (Starlette's TestClient, on the stub broker; one test on Redis): its
pages, the access rules (token, basic auth, the login form's cookie), the cross-site request
checks of every action, the binding rule, and that no page shows a credential."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import pytest
import redis
from starlette.testclient import TestClient

import epq
from epq.cli import main
from epq.dashboard import check_binding, create_app
from epq.errors import ConfigurationError
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, install
from tests.conftest import REDIS_URL
from tests.support.dashboard import Seeded, csrf_of, seed
from tests.support.servers import PrivateServer, free_port, stop_server

ORIGIN = {"origin": "http://127.0.0.1"}
NUMBERS = re.compile(r'<td class="num">(\d+)</td>')
LINKS = re.compile(r'href="/jobs/([0-9a-f-]{36})"')


@pytest.fixture
def seeded(epq_broker: dramatiq.Broker, epq_handlers: HandlerRegistry) -> Seeded:
    return seed(epq_broker, epq_handlers)


@pytest.fixture
def svc(epq_broker: dramatiq.Broker) -> epq.QueueService:
    return epq.QueueService(epq_broker)


def client(svc: epq.QueueService, **credentials: str) -> TestClient:
    return TestClient(create_app(svc, **credentials), base_url="http://127.0.0.1", follow_redirects=False)


def post(c: TestClient, path: str, page: str = "/queues", **fields: str) -> object:
    """POST a form as the dashboard's page ``page`` would (its CSRF token, the site's origin)."""
    token = csrf_of(c.get(page).text)
    return c.post(path, data={"csrf_token": token, **fields}, headers=ORIGIN)


def paused(svc: epq.QueueService, name: str) -> bool:
    return next(q for q in svc.queues() if q.name == name).paused


# ---- pages -------------------------------------------------------------------------------------


def test_each_page_shows_what_the_control_plane_says(svc: epq.QueueService, seeded: Seeded) -> None:
    c = client(svc)
    queues = c.get("/queues")
    assert queues.status_code == 200
    index_queue = svc.get_job(seeded.waiting[0]).queue  # type: ignore[union-attr]
    row = queues.text.split(f">{index_queue}</a>")[1].split("</tr>")[0]
    assert NUMBERS.findall(row)[:4] == ["2", "0", "1", "0"]  # waiting at p1..p4
    jobs = c.get("/jobs")
    assert jobs.status_code == 200
    for job_id in [*seeded.dead, seeded.completed, *seeded.waiting, seeded.scheduled]:
        assert job_id[:8] in jobs.text
    dead = c.get("/dead")
    assert all(job_id[:8] in dead.text for job_id in seeded.dead)
    assert "RegistrationRefused" in dead.text
    assert seeded.completed[:8] not in dead.text
    detail = c.get(f"/jobs/{seeded.dead[0]}").text
    assert "refused job nightly-1: HTTP 409" in detail
    assert "Traceback (most recent call last)" in detail
    assert "nightly-1" in detail  # its args
    assert "&#34;rows&#34;: 128" in c.get(f"/jobs/{seeded.completed}").text  # its output
    assert c.get("/jobs/00000000-0000-4000-8000-000000000000").status_code == 404


def test_the_job_list_filters_and_pages(svc: epq.QueueService, seeded: Seeded) -> None:
    c = client(svc)
    page = c.get("/jobs", params={"state": "available", "priority": "1"}).text
    assert all(job_id[:8] in page for job_id in seeded.waiting[:2])
    assert seeded.waiting[2][:8] not in page
    assert seeded.dead[0][:8] not in page
    by_endpoint = c.get("/jobs", params={"endpoint_id": "00000000-0000-4000-8000-00000000000b"}).text
    assert all(j[:8] in by_endpoint for j in (seeded.waiting[1], seeded.scheduled, seeded.completed))
    assert not any(j[:8] in by_endpoint for j in (seeded.waiting[0], seeded.waiting[2], *seeded.dead))
    bad = c.get("/jobs", params={"priority": "9"})
    assert bad.status_code == 400
    assert "priority: 1, 2, 3 or 4" in bad.text


def test_next_page_follows_the_cursor(svc: epq.QueueService, epq_broker: dramatiq.Broker) -> None:
    ids = [
        svc.enqueue_register_job(
            {"endpoint_id": "00000000-0000-4000-8000-00000000000a", "job_id": f"j{n}", "job_metadata": {}}
        ).job.id
        for n in range(55)
    ]
    c = client(svc)
    first = c.get("/jobs", params={"kind": "register_job", "order": "oldest"}).text
    next_url = first.split('rel="next"')[0].rsplit('href="', 1)[1].split('"')[0].replace("&amp;", "&")
    assert "kind=register_job" in next_url
    second = c.get(next_url).text
    on_first, on_second = LINKS.findall(first), LINKS.findall(second)
    assert len(set(on_first)) == 50
    assert sorted(on_first + on_second) == sorted(ids)
    assert 'rel="next"' not in second


def test_an_action_redirects_back_with_a_message(svc: epq.QueueService, seeded: Seeded) -> None:
    c = client(svc)
    page = f"/jobs/{seeded.scheduled}"
    done = post(c, f"{page}/cancel", page, back=page)
    assert done.status_code == 303  # type: ignore[attr-defined]
    assert done.headers["location"] == page  # type: ignore[attr-defined]
    assert svc.get_job(seeded.scheduled).state == "cancelled"  # type: ignore[union-attr]
    shown = c.get(page).text
    assert f"job {seeded.scheduled} is cancelled" in shown
    assert "job " + seeded.scheduled + " is cancelled" not in c.get(page).text  # shown once
    # a foreign "back" goes nowhere else
    away = post(c, f"/jobs/{seeded.dead[0]}/retry", page, back="//elsewhere.example/")
    assert away.headers["location"] == f"/jobs/{seeded.dead[0]}"  # type: ignore[attr-defined]


# ---- cross-site requests -----------------------------------------------------------------------


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(
    svc: epq.QueueService, seeded: Seeded
) -> None:
    c = client(svc)
    token = csrf_of(c.get("/queues").text)
    refused = [
        c.post("/queues/default/pause", data={}, headers=ORIGIN),
        c.post("/queues/default/pause", data={"csrf_token": "x" * 64}, headers=ORIGIN),
        c.post("/queues/default/pause", data={"csrf_token": "é" * 64}, headers=ORIGIN),
        c.post(
            "/queues/default/pause", data={"csrf_token": token}, headers={"origin": "http://evil.example"}
        ),
        c.post(
            "/queues/default/pause", data={"csrf_token": token}, headers={"referer": "http://evil.example/"}
        ),
        c.post("/queues/default/pause", data={"csrf_token": token}),  # neither Origin nor Referer
        c.post(f"/jobs/{seeded.dead[0]}/delete", data={"csrf_token": token}, headers={"origin": "null"}),
    ]
    assert [r.status_code for r in refused] == [403] * 7
    assert not paused(svc, "default")
    assert svc.get_job(seeded.dead[0]) is not None
    # another browser's token (another CSRF cookie) is refused too
    other = client(svc)
    assert other.post("/queues/default/pause", data={"csrf_token": token}, headers=ORIGIN).status_code == 403
    assert not paused(svc, "default")
    ok = c.post(
        "/queues/default/pause", data={"csrf_token": token}, headers={"referer": "http://127.0.0.1/queues"}
    )
    assert ok.status_code == 303
    assert paused(svc, "default")


def test_gets_change_nothing(svc: epq.QueueService, seeded: Seeded) -> None:
    c = client(svc)
    assert c.get("/queues/default/pause").status_code == 405
    assert c.get(f"/jobs/{seeded.dead[0]}/delete").status_code == 405
    assert not paused(svc, "default")
    assert svc.get_job(seeded.dead[0]) is not None


def test_without_credentials_it_answers_loopback_names_only(svc: epq.QueueService) -> None:
    c = client(svc)
    assert c.get("/queues", headers={"host": "localhost:8811"}).status_code == 200
    assert c.get("/queues", headers={"host": "[::1]:8811"}).status_code == 200
    # a page of another site whose name now resolves to 127.0.0.1 (DNS rebinding)
    rebound = {"host": "evil.example:8811", "origin": "http://evil.example:8811"}
    assert c.get("/queues", headers=rebound).status_code == 400
    token = csrf_of(c.get("/queues").text)
    assert c.post("/queues/default/pause", data={"csrf_token": token}, headers=rebound).status_code == 400
    assert not paused(svc, "default")
    # with credentials, any name (it is served beyond loopback)
    assert client(svc, token="t").get("/queues", headers={"host": "epq.example"}).status_code == 303


def test_pages_forbid_framing_and_scripts(svc: epq.QueueService) -> None:
    response = client(svc).get("/queues")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert "script-src" not in response.headers["content-security-policy"]  # (default-src 'none')
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()


# ---- access ------------------------------------------------------------------------------------


def test_with_a_token_every_request_without_it_is_refused(svc: epq.QueueService, seeded: Seeded) -> None:
    c = client(svc, token="s3cret-token")
    for path in ("/queues", "/jobs", f"/jobs/{seeded.dead[0]}", "/dead"):
        response = c.get(path)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/login?")
    assert "Log in" in c.get("/login").text
    token = csrf_of(c.get("/login").text)
    assert c.post("/queues/default/pause", data={"csrf_token": token}, headers=ORIGIN).status_code == 401
    wrong = {"authorization": "Bearer s3cret-tokeN"}
    assert c.get("/queues", headers=wrong).status_code == 303
    assert not paused(svc, "default")
    right = {"authorization": "Bearer s3cret-token"}
    assert c.get("/queues", headers=right).status_code == 200
    page = c.get("/queues", headers=right).text
    done = c.post("/queues/default/pause", data={"csrf_token": csrf_of(page)}, headers={**ORIGIN, **right})
    assert done.status_code == 303
    assert paused(svc, "default")


def test_basic_auth(svc: epq.QueueService) -> None:
    c = client(svc, user="ops", password="pa:ss")

    def basic(user: str, password: str) -> dict[str, str]:
        return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert c.get("/queues", headers=basic("ops", "pa:ss")).status_code == 200
    assert c.get("/queues", headers=basic("ops", "pa:sS")).status_code == 303
    assert c.get("/queues", headers=basic("opz", "pa:ss")).status_code == 303
    assert c.get("/queues", headers={"authorization": "Basic !!!"}).status_code == 303
    assert c.get("/queues").status_code == 303


def test_the_login_form_sets_an_httponly_strict_session_cookie(svc: epq.QueueService) -> None:
    c = client(svc, token="s3cret-token", user="ops", password="pw")
    form = c.get("/login?next=/dead").text
    assert 'name="user"' in form
    assert 'name="token"' in form
    data = {"csrf_token": csrf_of(form), "next": "/dead"}
    wrong = c.post("/login", data={**data, "token": "nope"}, headers=ORIGIN)
    assert wrong.status_code == 401
    assert "epq_session" not in wrong.headers.get("set-cookie", "")
    assert c.post("/login", data={**data, "user": "ops", "password": "pw"}).status_code == 403  # no origin
    done = c.post("/login", data={**data, "user": "ops", "password": "pw"}, headers=ORIGIN)
    assert done.status_code == 303
    assert done.headers["location"] == "/dead"
    cookie = done.headers["set-cookie"]
    assert cookie.startswith("epq_session=")
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert c.get("/queues").status_code == 200
    assert c.get("/dead").status_code == 200
    # a forged or altered session cookie is not one
    forged = client(svc, token="s3cret-token")
    for cookie in ("99999999999." + "0" * 64, "99999999999.é", "garbage"):
        sent = {"cookie": f"epq_session={cookie}".encode()}
        assert forged.get("/queues", headers=sent).status_code == 303
    # logging out ends it
    assert post(c, "/logout").status_code == 303  # type: ignore[attr-defined]
    assert c.get("/queues").status_code == 303


def test_login_goes_back_only_to_a_page_of_the_dashboard(svc: epq.QueueService) -> None:
    c = client(svc, token="t")
    form = c.get("/login?next=//evil.example/").text
    data = {"csrf_token": csrf_of(form), "next": "https://evil.example/", "token": "t"}
    assert c.post("/login", data=data, headers=ORIGIN).headers["location"] == "/queues"


# ---- binding -----------------------------------------------------------------------------------


def test_it_listens_beyond_loopback_only_with_credentials() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_binding(host, token=None, user=None, password=None)
    for host in ("0.0.0.0", "::", "192.0.2.10", "dashboard.example"):
        with pytest.raises(ConfigurationError, match="EPQ_DASHBOARD_TOKEN"):
            check_binding(host, token=None, user=None, password=None)
        check_binding(host, token="t", user=None, password=None)
        check_binding(host, token=None, user="u", password="p")
    with pytest.raises(ConfigurationError, match="EPQ_DASHBOARD_PASSWORD is not set"):
        check_binding("0.0.0.0", token=None, user="u", password=None)
    with pytest.raises(ConfigurationError, match="EPQ_DASHBOARD_TOKEN is empty"):
        check_binding("127.0.0.1", token="", user=None, password=None)


def test_the_command_refuses_to_start_on_another_address_without_credentials(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["dashboard", "--host", "0.0.0.0", "--port", "8899"]) == 1
    err = capsys.readouterr().err
    assert "does not listen on 0.0.0.0 without credentials" in err
    assert "dashboard on" not in err
    monkeypatch.setenv("EPQ_DASHBOARD_USER", "ops")
    reset_settings()
    assert main(["dashboard", "--host", "0.0.0.0", "--port", "8899"]) == 1
    assert "EPQ_DASHBOARD_PASSWORD is not set" in capsys.readouterr().err


# ---- credentials -------------------------------------------------------------------------------


@pytest.fixture
def redis_with_a_password(redis_client: redis.Redis) -> Iterator[str]:
    """The test Redis as a user with a password (an ACL user): its URL, with the password."""
    redis_client.execute_command(
        "ACL", "SETUSER", "dashboard-probe", "on", ">pw-never-shown", "~*", "&*", "+@all"
    )
    parts = urlsplit(REDIS_URL)
    where = parts.netloc.rpartition("@")[2]
    yield urlunsplit(parts._replace(netloc=f"dashboard-probe:pw-never-shown@{where}"))
    redis_client.execute_command("ACL", "DELUSER", "dashboard-probe")


@pytest.mark.redis
def test_no_page_shows_a_credential(redis_with_a_password: str, epq_handlers: HandlerRegistry) -> None:
    broker = install(redis_with_a_password)
    try:
        seeded = seed(broker, epq_handlers)
        c = client(epq.QueueService(broker))
        pages = ["/queues", "/jobs", "/dead", *(f"/jobs/{j}" for j in [*seeded.dead, seeded.completed])]
        for path in pages:
            text = c.get(path).text
            assert "pw-never-shown" not in text, path
            assert "redis://dashboard-probe:***@" in text, path
    finally:
        broker.flush_all()
        broker.close()


def test_an_action_on_a_job_that_is_gone_says_so(svc: epq.QueueService, seeded: Seeded) -> None:
    c = client(svc)
    svc.delete_job(seeded.dead[0])
    done = post(c, f"/jobs/{seeded.dead[0]}/retry", "/dead", back="/dead")
    assert done.headers["location"] == "/dead"  # type: ignore[attr-defined]
    assert f"no job {seeded.dead[0]} (expired or deleted)" in c.get("/dead").text
    assert post(c, "/queues/nowhere/pause", back="/queues").status_code == 303  # type: ignore[attr-defined]
    assert "unknown queue &#39;nowhere&#39;" in c.get("/queues").text
    assert c.get("/dead", params={"cursor": "not-a-cursor"}).status_code == 400


@pytest.mark.redis
def test_a_broker_that_is_gone_is_a_page_that_says_so(tmp_path: Path) -> None:
    server = PrivateServer("redis", free_port(20000, 29999), tmp_path / "redis")
    server.ensure_started()
    broker = install(f"{server.url}/0")
    try:
        c = client(epq.QueueService(broker))
        assert c.get("/queues").status_code == 200
        stop_server("redis", server.datadir)  # SIGKILL
        server.started = False
        gone = c.get("/queues")
        assert gone.status_code == 503
        assert "The broker or state store is unavailable" in gone.text
        assert "Connection" in gone.text
    finally:
        stop_server("redis", server.datadir)
        broker.close()
