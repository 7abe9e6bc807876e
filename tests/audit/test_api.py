"""The audit's Python API: it changes nothing, and every code it can report is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy.checks import CHECKS
from asgi_tenancy.errors import IsolationConfigError
from asgi_tenancy.operations import audit
from asgi_tenancy.sqlalchemy import QueryScoping
from tests.audit.conftest import AuditDatabase, unique

ROOT = Path(__file__).resolve().parents[2]


async def test_an_audit_inside_a_transaction_leaves_it_as_it_was(audit_db: AuditDatabase) -> None:
    engine = audit_db.engine()
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE kept (id int)"))
            await conn.execute(text("SET LOCAL search_path = pg_catalog"))
            state = text("SELECT current_user, current_setting('search_path')")
            before = tuple((await conn.execute(state)).one())
            report = await audit(conn, app_role=audit_db.role, schemas=["public"])
            assert report.app_role == audit_db.role
            assert tuple((await conn.execute(state)).one()) == before
            assert before[1] == "pg_catalog"
            assert await conn.scalar(text("SELECT to_regclass('public.kept')::text")) is not None
            await conn.rollback()
    finally:
        await engine.dispose()


async def test_an_auditor_that_cannot_become_the_app_role_is_refused(
    audit_db: AuditDatabase,
) -> None:
    other = unique("other")
    await audit_db.sql(f"CREATE ROLE {other} LOGIN NOSUPERUSER")
    engine = create_async_engine(audit_db.role_url(), poolclass=NullPool)
    try:
        with pytest.raises(IsolationConfigError, match="cannot act as the application role"):
            await audit(engine, app_role=other)
    finally:
        await engine.dispose()
        await audit_db.sql(f"DROP ROLE {other}")


async def test_an_app_role_that_is_not_a_plain_name_is_refused(audit_db: AuditDatabase) -> None:
    engine = audit_db.engine()
    try:
        with pytest.raises(IsolationConfigError):
            await audit(engine, app_role='app"; DROP TABLE x; --')
    finally:
        await engine.dispose()


def test_every_check_code_is_registered_once_and_used() -> None:
    core = ROOT / "asgi_tenancy" / "checks.py"
    sources = [p for p in (ROOT / "asgi_tenancy").rglob("*.py") if p != core]
    source = "".join(p.read_text() for p in sources)
    used = set(re.findall(r'"([RSQDAGCT]\d{3})"', source))
    assert used == set(CHECKS)  # nothing registered and unused, nothing used unregistered


def test_every_audit_code_is_documented_and_tested() -> None:
    codes = {code for code in CHECKS if code.startswith("A")}
    docs = (ROOT / "docs" / "audit.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests" / "audit").glob("test_*.py"))
    assert codes == {f"A{n:03d}" for n in range(1, 14)}
    assert {c for c in codes if f"| {c} |" not in docs} == set()
    assert {c for c in codes if f'"{c}"' not in tests} == set()


async def test_query_scoping_reports_its_own_configuration_findings(
    audit_db: AuditDatabase,
) -> None:
    metadata = sa.MetaData()
    sa.Table("orders", metadata, sa.Column("id", sa.Integer), sa.Column("tenant_id", sa.Text))
    sa.Table("plans", metadata, sa.Column("id", sa.Integer))
    report = await audit_db.audit(strategy=QueryScoping(metadata=metadata))
    assert report.strategy == "query"
    assert report.codes() == {("Q001", "plans"), ("Q004", "orders")}


async def test_the_application_role_can_audit_itself(audit_db: AuditDatabase) -> None:
    schema = unique("s")
    await audit_db.sql(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO {audit_db.role}",
        f"CREATE TABLE {schema}.orders (id int, tenant_id text)",
    )
    engine = create_async_engine(audit_db.role_url(), poolclass=NullPool)
    try:
        report = await audit(engine, app_role=audit_db.role, schemas=[schema])
    finally:
        await engine.dispose()
    table = f"{schema}.orders"
    assert report.codes() == {("R004", table), ("R005", table), ("R006", table), ("A005", table)}
