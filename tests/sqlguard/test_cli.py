"""``asgi-tenancy sql check``: the rewritten query or the refusal, as text or JSON."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from asgi_tenancy.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, main

TABLES = ["--tenant-table", "orders", "--tenant-table", "items=org_id", "--shared-table", "fx"]


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(["sql", "check", *argv], out=out)
    return status, out.getvalue()


def test_check_prints_the_rewritten_query_with_the_tenant_as_a_parameter() -> None:
    status, out = _run(
        "--tenant", "acme", *TABLES, "SELECT * FROM orders o JOIN items i USING (id)"
    )
    assert status == EXIT_OK
    assert '"public"."orders" WHERE "tenant_id" = :tenant_id' in out
    assert '"public"."items" WHERE "org_id" = :tenant_id' in out
    assert out.rstrip().endswith('-- params: {"tenant_id": "acme"}')


def test_check_json_reports_sql_params_and_tables() -> None:
    status, out = _run("--tenant", "acme", *TABLES, "SELECT * FROM orders, fx", "--json")
    body = json.loads(out)
    assert status == EXIT_OK
    assert body["ok"] is True
    assert body["params"] == {"tenant_id": "acme"}
    assert body["tables"] == ["fx", "orders"]
    assert "acme" not in body["sql"]


def test_check_prints_the_refusal_and_exits_1() -> None:
    status, out = _run("--tenant", "acme", *TABLES, "SELECT * FROM pg_catalog.pg_class")
    assert status == EXIT_REFUSED
    assert out.startswith("refused (schema_not_allowed): ")
    status, out = _run("--tenant", "acme", *TABLES, "DELETE FROM orders", "--json")
    assert status == EXIT_REFUSED
    assert json.loads(out)["reason"] == "not_a_select"


def test_check_reads_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT count(*) FROM orders"))
    status, out = _run("--tenant", "acme", *TABLES, "-")
    assert status == EXIT_OK
    assert "count(*)" in out


def test_bad_configuration_or_tenant_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--tenant", "acme", "SELECT 1")[0] == EXIT_USAGE  # no tables declared
    assert _run("--tenant", "bad tenant!", *TABLES, "SELECT 1")[0] == EXIT_USAGE
    assert "bad tenant" not in capsys.readouterr().err
    assert main(["sql", "check", "SELECT 1"]) == 2  # --tenant is required


def test_the_console_script_entry_point_runs() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asgi_tenancy.cli",
            "sql",
            "check",
            "--tenant",
            "t1",
            *TABLES,
            "SELECT 1 FROM orders",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert json.loads(done.stdout)["ok"] is True
