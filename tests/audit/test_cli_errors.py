"""Every usage or connection error of the CLI: exit 2 and one line on stderr, never a traceback.

The commands and their error inputs are enumerated (every command that loads ``--app`` times
every way ``--app`` can be wrong or its database unreachable, every subcommand times a bad
option), and each answer is held to the same rules: exit 2, one line, no traceback, no
credential, and a message that does not repeat what was typed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from asgi_tenancy import Tenant, __version__
from asgi_tenancy.cli import EXIT_OK, EXIT_USAGE, build_parser, main
from asgi_tenancy.sqlalchemy import SchemaPerTenant
from tests.audit import apps
from tests.audit.conftest import AuditDatabase, unique

SECRET = "s3cret-pa55"
UNREACHABLE = f"postgresql+asyncpg://owner:{SECRET}@127.0.0.1:1/nowhere"

# Every command that loads the application, with the arguments it needs besides --app.
APP_COMMANDS = [
    ["tenants", "list"],
    ["tenants", "show", "acme"],
    ["tenants", "create", "acme"],
    ["tenants", "suspend", "acme"],
    ["tenants", "activate", "acme"],
    ["tenants", "drop", "acme", "--yes"],
    ["migrate", "--all"],
    ["audit"],
    ["policy"],
    ["policy", "--apply"],
]

BAD_APPS = [
    "nocolon",
    ":attribute",
    "module:",
    "tests.audit.no_such_module:app",
    "tests.audit.apps:nothing_here",
    "tests.audit.apps:NOT_A_PROVISIONER",
    "tests.audit.apps:needs_arguments",
    "tests.audit.apps:explodes",
    "tests.audit.broken_app:app",
]


def _subcommands() -> list[list[str]]:
    """Every leaf command of the parser, as the words that name it."""
    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found.append(words)
        for sub in subs:
            for name, child in sub.choices.items():
                walk(child, [*words, name])

    walk(build_parser(), [])
    return found


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    out = io.StringIO()
    status = main(argv, out=out)
    captured = capsys.readouterr()
    return status, out.getvalue() + captured.out, captured.err


def _one_line_usage_error(status: int, out: str, err: str, *typed: str) -> None:
    assert status == EXIT_USAGE, err
    assert out == ""
    assert err.endswith("\n")
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert SECRET not in err
    for text in typed:
        assert text not in err, err  # the message says what is wrong, not what was typed


@pytest.mark.parametrize("command", APP_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("app", BAD_APPS)
def test_a_wrong_app_target_is_one_line_and_exit_2(
    command: list[str], app: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run([*command, "--app", app], capsys)
    typed = [app] if app.count(":") == 1 and all(app.split(":")) else []
    _one_line_usage_error(status, out, err, *typed)
    assert err.startswith("error (isolation_config): ")


@pytest.mark.parametrize("command", [c for c in APP_COMMANDS if c != ["policy"]], ids=" ".join)
@pytest.mark.parametrize(
    "url", [UNREACHABLE, f"::{SECRET}::", f"mysql://u:{SECRET}@h/db"], ids=["down", "bad", "mysql"]
)
def test_an_unreachable_or_bad_url_is_one_line_and_exit_2(
    command: list[str],
    url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: os.PathLike[str],
) -> None:
    monkeypatch.setenv(apps.URL_VAR, url)
    monkeypatch.setenv(apps.ROLE_VAR, "app")
    monkeypatch.chdir(tmp_path)  # no alembic.ini here: migrate fails on it or the URL
    # (``policy`` without --apply only prints the DDL: it never connects.)
    status, out, err = _run([*command, "--app", "tests.audit.apps:rls_app"], capsys)
    _one_line_usage_error(status, out, err, "127.0.0.1", "owner")


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", UNREACHABLE],
        ["audit", UNREACHABLE, "--app-role", "app", "--strategy", "schema"],
        ["audit", f"::{SECRET}::"],
        ["audit", f"sqlite:///{SECRET}.db"],
        ["audit", "postgresql://u@h/db", "--app-role", "Not A Role"],
        ["audit", "--app-role", "app"],
    ],
)
def test_catalog_audit_errors_are_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(argv, capsys)
    _one_line_usage_error(status, out, err, "127.0.0.1")


@pytest.mark.parametrize("words", _subcommands(), ids=" ".join)
def test_a_bad_option_on_every_command_is_one_line_and_exit_2(
    words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run([*words, "--no-such-option"], capsys)
    _one_line_usage_error(status, out, err)
    assert err.startswith("asgi-tenancy")
    assert ": error: " in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["tenants"],
        ["no-such-command"],
        ["sql", "check", "SELECT 1"],  # --tenant missing
        ["tenants", "show"],  # ID missing
        ["tenants", "create", "x", "--attr", "novalue"],
        ["migrate"],
        ["migrate", "--all", "acme"],
        ["migrate", "--all", "--canary", "0"],
        ["migrate", "--all", "--lock-timeout", "soon"],
        ["audit", "--strategy", "citus"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(argv, capsys)
    _one_line_usage_error(status, out, err)


def test_every_option_of_every_command_has_help() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*words, name])
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(
                    f"{' '.join(words)} {'/'.join(action.option_strings) or action.dest}"
                )

    walk(build_parser(), ["asgi-tenancy"])
    assert missing == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out == f"asgi-tenancy {__version__}\n"


def test_the_console_script_starts_without_a_warning() -> None:
    """No XDG_RUNTIME_DIR warning (pgserver's platformdirs) or any other on start."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["PYTHONWARNINGS"] = "default"
    for argv in (["--version"], ["tenants", "list", "--app", "nocolon"]):
        done = subprocess.run(
            [sys.executable, "-m", "asgi_tenancy.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        lines = done.stderr.splitlines()
        assert "Warning" not in done.stderr
        assert "XDG_RUNTIME_DIR" not in done.stderr
        assert len(lines) <= 1
    assert done.returncode == EXIT_USAGE


@pytest.fixture
def app_env(audit_db: AuditDatabase, monkeypatch: pytest.MonkeyPatch) -> AuditDatabase:
    asyncio.run(apps.create_tables(audit_db.db.admin_url))
    monkeypatch.setenv(apps.URL_VAR, audit_db.db.admin_url)
    monkeypatch.setenv(apps.ROLE_VAR, audit_db.role)
    return audit_db


@pytest.mark.parametrize("action", [["list"], ["create", "acme"], ["show", "acme"]])
def test_a_missing_registry_table_says_so_in_one_line(
    action: list[str], app_env: AuditDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tenants", *action, "--app", "tests.audit.apps:missing_registry_app"]
    status, out, err = _run(argv, capsys)
    _one_line_usage_error(status, out, err)
    assert "registry table" in err
    assert "does not exist" in err
    assert "create_tenants_table()" in err


def test_the_catalog_audit_without_app_role_audits_the_urls_own_role(
    app_env: AuditDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(["audit", app_env.role_url(), "--json", "--schema", "public"], capsys)
    assert f'"app_role": "{app_env.role}"' in out
    assert status in (0, 1)


def test_a_schema_database_audited_with_strategy_schema_has_no_false_findings(
    app_env: AuditDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    metadata = sa.MetaData()
    sa.Table("notes", metadata, sa.Column("id", sa.Integer, primary_key=True))
    strategy = SchemaPerTenant(metadata=metadata, shared_schema=None)
    tenants = [Tenant(unique("acme")), Tenant(unique("globex"))]

    async def create() -> None:
        engine = app_env.engine()
        try:
            async with engine.begin() as conn:
                for tenant in tenants:
                    await strategy.create_tenant_schema(conn, tenant, app_env.role)
        finally:
            await engine.dispose()

    asyncio.run(create())
    schemas = [arg for t in tenants for arg in ("--schema", strategy.schema_for(t))]
    url = app_env.db.admin_url
    status, out, _ = _run(["audit", url, "--app-role", app_env.role, *schemas, "--json"], capsys)
    assert status == 1  # judged as row-level security: every tenant table unclassified
    unclassified = {f["subject"] for f in json.loads(out)["findings"] if f["code"] == "R011"}
    assert unclassified == {f"{strategy.schema_for(t)}.notes" for t in tenants}
    argv = ["audit", url, "--app-role", app_env.role, "--strategy", "schema", "--json"]
    status, out, _ = _run(argv, capsys)
    body = json.loads(out)
    assert (status, body["findings"], body["strategy"]) == (0, [], "schema")
    assert {t.id for t in tenants} <= set(body["tenants"])
    status, out, err = _run(
        ["audit", "--app", "tests.audit.apps:rls_app", "--strategy", "row"], capsys
    )
    _one_line_usage_error(status, out, err)
