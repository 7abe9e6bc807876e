"""``asgi-tenancy tenants ...`` end to end against the real PostgreSQL, read back as admin."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, main
from tests.conftest import PgDatabase
from tests.lifecycle.conftest import RUN

APP = "tests.lifecycle.cli_app:provisioner"


@pytest.fixture
def app_env(lifecycle_database: PgDatabase, monkeypatch: pytest.MonkeyPatch) -> PgDatabase:
    monkeypatch.setenv("LIFECYCLE_ADMIN_URL", lifecycle_database.admin_url)
    monkeypatch.setenv("LIFECYCLE_APP_URL", lifecycle_database.app_url)
    monkeypatch.delenv("LIFECYCLE_STRATEGY", raising=False)
    return lifecycle_database


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(["tenants", *argv, "--app", APP], out=out)
    return status, out.getvalue()


def _json(*argv: str) -> tuple[int, Any]:
    status, out = _run(*argv, "--json")
    return status, json.loads(out)


def _scalar(db: PgDatabase, sql: str, **params: Any) -> Any:
    async def read() -> Any:
        engine = create_async_engine(db.admin_url)
        try:
            async with engine.connect() as conn:
                return await conn.scalar(text(sql), params)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _id() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


def test_create_show_suspend_activate_drop(app_env: PgDatabase) -> None:
    tenant_id = _id()
    schema = f"{RUN}_{tenant_id}"
    status, body = _json("create", tenant_id, "--attr", "plan=pro", "--attr", "region=eu")
    assert status == EXIT_OK
    assert body == {
        "ok": True,
        "tenant": {
            "id": tenant_id,
            "status": "active",
            "attributes": {"plan": "pro", "region": "eu", "schema": schema},
        },
    }
    assert _scalar(app_env, "SELECT count(*) FROM pg_namespace WHERE nspname = :n", n=schema) == 1

    assert _json("show", tenant_id)[1]["tenant"]["status"] == "active"
    assert _json("suspend", tenant_id)[1]["tenant"]["status"] == "suspended"
    row = "SELECT status FROM public.tenants WHERE id = :id"
    assert _scalar(app_env, row, id=tenant_id) == "suspended"
    status, out = _run("activate", tenant_id)
    assert status == EXIT_OK
    assert out.startswith(f"{tenant_id}\tactive\t")
    assert _scalar(app_env, row, id=tenant_id) == "active"

    status, out = _run("list")
    assert status == EXIT_OK
    assert f"{tenant_id}\tactive\t" in out
    ids = [t["id"] for t in _json("list")[1]["tenants"]]
    assert tenant_id in ids
    assert ids == sorted(ids)

    assert _json("drop", tenant_id, "--yes") == (EXIT_OK, {"ok": True, "dropped": tenant_id})
    assert _scalar(app_env, row, id=tenant_id) is None
    assert _scalar(app_env, "SELECT count(*) FROM pg_namespace WHERE nspname = :n", n=schema) == 0


def test_drop_without_yes_is_refused_and_keeps_the_tenant(app_env: PgDatabase) -> None:
    tenant_id = _id()
    assert _run("create", tenant_id)[0] == EXIT_OK
    status, body = _json("drop", tenant_id)
    assert status == EXIT_REFUSED
    assert body["code"] == "confirmation_required"
    assert body["hint"] == "pass --yes"
    assert _scalar(app_env, "SELECT count(*) FROM public.tenants WHERE id = :id", id=tenant_id)
    assert _run("drop", tenant_id, "--yes")[0] == EXIT_OK


def test_unknown_or_existing_tenants_exit_1(
    app_env: PgDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    unknown = _id()
    for action in ("show", "suspend", "activate"):
        status, body = _json(action, unknown)
        assert (status, body["code"]) == (EXIT_REFUSED, "tenant_not_found")
    assert _run("drop", unknown, "--yes")[0] == EXIT_REFUSED
    assert "error (tenant_not_found)" in capsys.readouterr().err
    tenant_id = _id()
    assert _run("create", tenant_id)[0] == EXIT_OK
    status, body = _json("create", tenant_id)
    assert (status, body["code"]) == (EXIT_REFUSED, "tenant_exists")


def test_usage_errors_exit_2(app_env: PgDatabase) -> None:
    status, body = _json("create", "not a valid id")
    assert (status, body["code"]) == (EXIT_USAGE, "invalid_tenant_identifier")
    out = io.StringIO()
    assert main(["tenants", "list", "--app", "tests.lifecycle.cli_app:nope"], out=out) == EXIT_USAGE
    bad = ["tenants", "list", "--json", "--app", "tests.lifecycle.cli_app:not_a_provisioner"]
    assert main(bad, out=out) == EXIT_USAGE
    assert json.loads(out.getvalue())["code"] == "isolation_config"
    assert main(["tenants", "create", "x", "--attr", "novalue"]) == EXIT_USAGE


def test_database_tenant_url_is_shown_without_its_password(
    app_env: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_STRATEGY", "database")
    tenant_id = _id()
    status, out = _run("create", tenant_id)
    assert status == EXIT_OK
    assert "tenancy-app-test" not in out  # the app role's password (tests/conftest.py)
    assert "***" in out
    stored = _scalar(
        app_env,
        "SELECT attributes->>'database_url' FROM public.tenants WHERE id = :id",
        id=tenant_id,
    )
    assert "tenancy-app-test" in stored  # the strategy needs it; only the output masks it
    name = f"{RUN}_{tenant_id}"
    assert _scalar(app_env, "SELECT count(*) FROM pg_database WHERE datname = :n", n=name) == 1
    assert _run("drop", tenant_id, "--yes")[0] == EXIT_OK
    assert _scalar(app_env, "SELECT count(*) FROM pg_database WHERE datname = :n", n=name) == 0


def test_the_installed_command_reads_the_app_from_the_environment(app_env: PgDatabase) -> None:
    env = {**os.environ, "TENANCY_APP": APP}
    result = subprocess.run(
        [sys.executable, "-m", "asgi_tenancy.cli", "tenants", "show", _id(), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_REFUSED, result.stderr
    assert json.loads(result.stdout)["code"] == "tenant_not_found"
