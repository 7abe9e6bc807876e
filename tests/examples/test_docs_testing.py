"""docs/testing.md, run as a reader would: its titled code blocks written out as files of a
project of their own, and pytest run on it (``pytester``) against the session's PostgreSQL.

``myapp.models`` is the example app's models; everything else comes from the page.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PgServer

pytest_plugins = ["pytester"]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)

# Not on the page: what a reader's project already has, and a use of kits.py.
MODELS = "from examples.fastapi_app.models import *  # noqa: F403\n"
KITS = """
from asgi_tenancy.testing import leak_tests
from kits import DATABASES, QUERY, SCHEMAS

test_query = leak_tests(QUERY)
test_schemas = leak_tests(SCHEMAS)
test_databases = leak_tests(DATABASES)
"""


def blocks() -> dict[str, str]:
    return {name: code for _, name, code in BLOCK.findall(PAGE.read_text())}


def test_the_page_names_its_files() -> None:
    assert set(blocks()) == {
        "conftest.py",
        "pytest.ini",
        "test_isolation.py",
        "test_projects.py",
        "kits.py",
    }


def test_the_page_runs(
    pytester: pytest.Pytester, pg_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "TENANCY_TEST_DATABASE_URL", pg_server.admin_url.render_as_string(hide_password=False)
    )
    for name, code in blocks().items():
        (pytester.path / name).write_text(code)
    (pytester.path / "myapp").mkdir()
    (pytester.path / "myapp" / "__init__.py").write_text("")
    (pytester.path / "myapp" / "models.py").write_text(MODELS)
    (pytester.path / "test_kits.py").write_text(KITS)
    monkeypatch.syspath_prepend(pytester.path)
    result = pytester.inline_run("-p", "no:cacheprovider")
    passed, skipped, failed = result.listoutcomes()
    assert not failed, [r.longreprtext[-2000:] for r in failed]
    assert not skipped
    names = {r.nodeid.split("::")[-1] for r in passed}
    assert {
        "test_each_tenant_lists_its_own_projects",
        "test_a_new_project_lands_in_its_tenant_only",
        "test_the_rows_are_back_for_every_test",
        "test_isolation[Project-read]",
        "test_isolation[Task-move]",
        "test_databases[AuditEvent-insert]",
    } <= names
    # row-level security and query scoping: 3 models x 5 probes; schemas, databases: x 4
    assert len(names) == 3 + 15 + 15 + 12 + 12
