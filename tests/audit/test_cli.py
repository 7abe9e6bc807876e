"""``asgi-tenancy audit`` and ``asgi-tenancy policy``: exit codes, text and ``--json``."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from asgi_tenancy.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, main
from tests.audit import apps
from tests.audit.conftest import AuditDatabase, unique


@pytest.fixture(scope="module")
def cli_db(audit_db: AuditDatabase) -> AuditDatabase:
    asyncio.run(apps.create_tables(audit_db.db.admin_url))
    return audit_db


@pytest.fixture
def app_env(cli_db: AuditDatabase, monkeypatch: pytest.MonkeyPatch) -> AuditDatabase:
    monkeypatch.setenv(apps.URL_VAR, cli_db.db.admin_url)
    monkeypatch.setenv(apps.ROLE_VAR, cli_db.role)
    monkeypatch.setenv(apps.ROLE_URL_VAR, cli_db.role_url())
    return cli_db


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def _catalog(db: AuditDatabase, *options: str) -> list[str]:
    return ["audit", db.db.admin_url, "--app-role", db.role, *options]


def test_audit_fails_until_policy_apply_then_passes(app_env: AuditDatabase) -> None:
    status, out = _run("audit", "--app", "tests.audit.apps:rls_app", "--json")
    body = json.loads(out)
    assert status == EXIT_REFUSED
    assert body["ok"] is False
    assert body["strategy"] == "row"
    codes = {(f["code"], f["subject"]) for f in body["findings"]}
    assert {("R004", "orders"), ("R005", "orders"), ("R006", "orders")} <= codes
    assert all(f["fix"] for f in body["findings"])

    status, out = _run("policy", "--app", "tests.audit.apps:rls_app", "--apply", "--json")
    assert status == EXIT_OK
    assert json.loads(out)["applied"] is True

    status, out = _run("audit", "--app", "tests.audit.apps:rls_app")
    assert (status, out.splitlines()[-1][:3]) == (EXIT_OK, "ok ")
    # The catalog alone agrees, once the non-tenant tables are declared shared.
    status, out = _run(*_catalog(app_env, "--shared", "plans", "--shared", "public.tenants"))
    assert status == EXIT_OK, out


def test_audit_text_names_code_subject_and_fix(app_env: AuditDatabase) -> None:
    schema = unique("s")
    asyncio.run(
        app_env.sql(
            f"CREATE SCHEMA {schema}",
            f"GRANT USAGE ON SCHEMA {schema} TO {app_env.role}",
            f"CREATE TABLE {schema}.items (id int, tenant_id text)",
        )
    )
    status, out = _run(*_catalog(app_env, "--schema", schema))
    assert status == EXIT_REFUSED
    assert f"R004 {schema}.items: row-level security is not enabled" in out
    assert f"    fix: ALTER TABLE {schema}.items ENABLE ROW LEVEL SECURITY;" in out
    assert out.splitlines()[-1].startswith("4 findings (")
    status, out = _run(*_catalog(app_env, "--schema", schema, "--json"))
    assert status == EXIT_REFUSED
    assert json.loads(out)["tables"] == [f"{schema}.items"]


def test_policy_prints_the_ddl_without_applying_it(app_env: AuditDatabase) -> None:
    status, out = _run("policy", "--app", "tests.audit.apps:rls_app")
    assert status == EXIT_OK
    assert "CREATE OR REPLACE FUNCTION public.tenancy_current_tenant()" in out
    assert "ALTER TABLE orders FORCE ROW LEVEL SECURITY;" in out
    assert "plans" not in out


def test_policy_of_a_signed_app_includes_the_key_table_but_never_a_key(
    app_env: AuditDatabase,
) -> None:
    status, out = _run("policy", "--app", "tests.audit.apps:signed_app", "--json")
    body = json.loads(out)
    assert status == EXIT_OK
    assert body == {"statements": body["statements"], "signed": True, "applied": False}
    assert any("tenancy_private.binding_keys" in s for s in body["statements"])
    assert apps.SIGNING_KEY not in out
    status, out = _run("policy", "--app", "tests.audit.apps:signed_app")
    assert "--apply also installs the signing keys" in out


def test_policy_refuses_a_strategy_without_policies(
    app_env: AuditDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = _run("policy", "--app", "tests.audit.apps:schema_app")
    assert status == EXIT_USAGE
    assert "installs no policies" in capsys.readouterr().err


def test_a_statement_the_database_refuses_is_exit_2_with_its_sqlstate(
    app_env: AuditDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = _run("policy", "--app", "tests.audit.apps:rls_app_without_rights", "--apply")
    err = capsys.readouterr().err
    assert status == EXIT_USAGE
    assert "the database refused a statement (ProgrammingError, SQLSTATE 42501)" in err
    assert "audit-role-test" not in err  # the role's password


def test_unreachable_database_is_exit_2_and_never_shows_the_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "postgresql://auditor:pa55-w0rd-x@127.0.0.1:1/somedb"
    status, out = _run("audit", url, "--app-role", "app")
    captured = capsys.readouterr()
    assert status == EXIT_USAGE
    assert "cannot be reached" in captured.err
    for text in (out, captured.out, captured.err):
        assert "pa55-w0rd-x" not in text
        assert "auditor" not in text
        assert "127.0.0.1" not in text


def test_malformed_url_is_exit_2_and_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = _run("audit", "::pa55-w0rd-x::", "--app-role", "app")
    assert status == EXIT_USAGE
    assert "pa55-w0rd-x" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "postgresql://u@h/db"],  # no --app-role
        ["audit", "--app-role", "app"],  # no URL
        ["audit", "postgresql://u@h/db", "--app", "tests.audit.apps:rls_app"],  # both
        ["audit", "--app-role", "app", "--app", "tests.audit.apps:rls_app"],
        ["audit", "postgresql://u@h/db", "--app-role", "Not A Role"],
        ["policy", "--app", "tests.audit.apps:nothing_here"],
        ["policy", "--app", "tests.audit.no_such_module:app"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], app_env: AuditDatabase) -> None:
    assert _run(*argv)[0] == EXIT_USAGE
