"""``policy --apply`` of a signed application installs what its audit then finds complete."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from sqlalchemy import text

from asgi_tenancy.cli import EXIT_OK, EXIT_REFUSED, main
from tests.audit import apps
from tests.audit.conftest import AuditDatabase


async def _key_rows(audit_db: AuditDatabase) -> int:
    engine = audit_db.engine()
    try:
        async with engine.connect() as conn:
            return int(
                await conn.scalar(text("SELECT count(*) FROM tenancy_private.binding_keys")) or 0
            )
    finally:
        await engine.dispose()


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_signed_policy_apply_then_audit_is_clean(
    audit_db: AuditDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(apps.create_tables(audit_db.db.admin_url))
    monkeypatch.setenv(apps.URL_VAR, audit_db.db.admin_url)
    monkeypatch.setenv(apps.ROLE_VAR, audit_db.role)
    app = "tests.audit.apps:signed_app"

    status, out = _run("audit", "--app", app, "--json")
    assert status == EXIT_REFUSED
    assert ("R013", "public.tenancy_current_tenant") in {
        (f["code"], f["subject"]) for f in json.loads(out)["findings"]
    }

    status, out = _run("policy", "--app", app, "--apply")
    assert status == EXIT_OK
    assert apps.SIGNING_KEY not in out
    assert asyncio.run(_key_rows(audit_db)) == 1

    status, out = _run("audit", "--app", app)
    assert status == EXIT_OK, out
