"""The outbox without a database: what it imports, its settings, the SQL the README shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import epq
from epq.outbox import schema_sql
from epq.outbox.connections import display_dsn
from epq.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def test_without_the_outbox_nothing_of_psycopg_or_sqlalchemy_is_imported() -> None:
    # an application, a worker's set-up and the test plugin, with no EPQ_OUTBOX_URL
    code = (
        "import sys, uuid, epq, epq.actors, epq.testing, epq.outbox, epq.cli\n"
        "epq.QueueService().enqueue_index_endpoint({'endpoint_id': str(uuid.uuid4()), 'source': 'API'})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'psycopg2', 'sqlalchemy')))\n"
    )
    out = _run(code, EPQ_BROKER_URL="stub://")
    assert (out.returncode, out.stdout) == (0, "[]\n"), out.stderr


def test_the_outbox_without_psycopg_says_which_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"  # (as if it were not installed)
        "import epq\n"
        "try:\n"
        "    epq.setup()\n"
        "except epq.ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    out = _run(code, EPQ_BROKER_URL="stub://", EPQ_OUTBOX_URL="postgresql://localhost/app")
    assert out.stdout == "EPQ_OUTBOX_URL is set, but psycopg is not installed: pip install 'epq[postgres]'\n"


@pytest.mark.parametrize("name", ["epq_outbox", "app.epq_outbox", "_x.y_1"])
def test_outbox_table_names(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_OUTBOX_TABLE", name)
    assert get_settings().outbox_table == name


@pytest.mark.parametrize(
    "name", ["Outbox", "a.b.c", "1outbox", "outbox; drop table x", '"quoted"', "", "x" * 51, "s." + "x" * 51]
)
def test_an_outbox_table_name_that_is_not_one_is_refused_naming_the_setting(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EPQ_OUTBOX_TABLE", name)
    with pytest.raises(epq.ConfigurationError, match=r"EPQ_OUTBOX_TABLE: .*not a table name"):
        get_settings()


def test_database_urls_are_shown_without_their_password() -> None:
    assert display_dsn("postgresql://app:s3cret@db:5432/app") == "postgresql://app:***@db:5432/app"
    assert display_dsn("host=db password=s3cret user=app") == "host=db password=*** user=app"
    assert display_dsn("host=db password='s3 cr\\'et' user=app") == "host=db password=*** user=app"
    assert display_dsn("host=db user=app") == "host=db user=app"


def test_the_readme_shows_the_sql_epq_outbox_migrate_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    assert schema_sql("epq_outbox") in blocks
