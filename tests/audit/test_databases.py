"""The audit with a DatabasePerTenant application: one reachable database per tenant, alike.

Tenant databases are real databases of the test server; tenants reach them as the module's
application role, except where a test gives one the superuser's URL on purpose.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from asgi_tenancy import Tenant
from asgi_tenancy.operations import AuditReport
from asgi_tenancy.sqlalchemy import DatabasePerTenant
from tests.audit.conftest import AuditDatabase
from tests.conftest import PgDatabase, PgServer, create_database, drop_database

STRATEGY = DatabasePerTenant()


@pytest.fixture(scope="module")
def tenant_dbs(pg_server: PgServer, audit_db: AuditDatabase) -> Iterator[list[PgDatabase]]:
    created = [create_database(pg_server, f"tenant_{i}") for i in range(3)]
    try:
        yield created
    finally:
        for db in created:
            drop_database(pg_server, db)


def _tenant(label: str, url: str | None) -> Tenant:
    attributes = {} if url is None else {"database_url": url}
    return Tenant(f"{label}-{uuid.uuid4().hex[:6]}", attributes=attributes)


async def _audit(audit_db: AuditDatabase, *tenants: Tenant) -> AuditReport:
    return await audit_db.audit(strategy=STRATEGY, tenants=tenants)


async def _set_revision(audit_db: AuditDatabase, db: PgDatabase, revision: str) -> None:
    await audit_db.sql(
        "CREATE TABLE IF NOT EXISTS public.alembic_version (version_num text)",
        "DELETE FROM public.alembic_version",
        f"INSERT INTO public.alembic_version VALUES ('{revision}')",
        database=db.name,
    )


async def test_one_database_per_tenant_at_one_revision_yields_no_findings(
    audit_db: AuditDatabase, tenant_dbs: list[PgDatabase]
) -> None:
    for db in tenant_dbs[:2]:
        await _set_revision(audit_db, db, "r1")
    tenants = [_tenant("acme", tenant_dbs[0].app_url), _tenant("globex", tenant_dbs[1].app_url)]
    report = await _audit(audit_db, *tenants)
    assert report.findings == ()
    assert report.strategy == "database"


async def test_two_tenants_on_one_database_are_d002(
    audit_db: AuditDatabase, tenant_dbs: list[PgDatabase]
) -> None:
    db = tenant_dbs[0]
    same_url = [_tenant("acme", db.app_url), _tenant("globex", db.app_url)]
    assert (await _audit(audit_db, *same_url)).codes() == {("D002", db.name)}
    # The same database through another spelling of the URL is caught by its identity.
    alias = make_url(db.admin_url)  # another user, and the server spelled another way
    if "host" in alias.query:  # a Unix socket: the same directory, with a trailing slash
        alias = alias.update_query_dict({"host": str(alias.query["host"]) + "/"})
    else:  # TCP: the same server by another name
        alias = alias.set(host="localhost" if alias.host == "127.0.0.1" else "127.0.0.1")
    other_spelling = alias.render_as_string(hide_password=False)
    spelled = [_tenant("acme", db.app_url), _tenant("globex", other_spelling)]
    codes = (await _audit(audit_db, *spelled)).codes()
    assert ("D002", db.name) in codes


async def test_a_tenant_on_the_applications_own_database_is_d002(
    audit_db: AuditDatabase,
) -> None:
    tenant = _tenant("acme", audit_db.db.app_url)
    assert (await _audit(audit_db, tenant)).codes() == {("D002", audit_db.name)}


async def test_a_missing_tenant_database_is_a010_and_its_fix_creates_it(
    audit_db: AuditDatabase, pg_server: PgServer
) -> None:
    name = f"t_missing_{uuid.uuid4().hex[:8]}"
    tenant = _tenant("acme", pg_server.url(name, app=True))
    report = await _audit(audit_db, tenant)
    assert report.codes() == {("A010", name)}
    assert "tenancy-app-test" not in str(report.as_dict())  # the URL's password never shows
    try:
        await audit_db.sql(report.findings[0].fix, database=pg_server.admin_url.database)
        assert (await _audit(audit_db, tenant)).findings == ()
    finally:
        await audit_db.sql(
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', database=pg_server.admin_url.database
        )


async def test_an_unreachable_tenant_database_is_a010(audit_db: AuditDatabase) -> None:
    tenant = _tenant("acme", "postgresql+asyncpg://u:s3cret@127.0.0.1:1/tenant_db")
    report = await _audit(audit_db, tenant)
    assert report.codes() == {("A010", "tenant_db")}
    assert "s3cret" not in str(report.as_dict())


async def test_a_superuser_tenant_url_is_d004(
    audit_db: AuditDatabase, tenant_dbs: list[PgDatabase]
) -> None:
    db = tenant_dbs[2]
    role = f"su_{uuid.uuid4().hex[:8]}"
    url = make_url(db.admin_url).set(username=role, password="su-test")
    tenant = _tenant("acme", url.render_as_string(hide_password=False))
    await audit_db.sql(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'su-test'")
    try:
        report = await _audit(audit_db, tenant)
        assert report.codes() == {("D004", db.name)}
        await audit_db.sql(report.findings[0].fix)
        assert (await _audit(audit_db, tenant)).findings == ()
    finally:
        await audit_db.sql(f"DROP ROLE {role}")


async def test_the_bootstrap_superuser_as_a_tenant_is_d004_with_a_role_of_its_own_as_fix(
    audit_db: AuditDatabase, tenant_dbs: list[PgDatabase]
) -> None:
    db = tenant_dbs[2]
    report = await _audit(audit_db, _tenant("acme", db.admin_url))  # postgres, oid 10
    [finding] = [f for f in report.findings if f.code == "D004"]
    assert "ALTER ROLE" not in finding.fix
    assert "CREATE ROLE" in finding.fix


async def test_a_tenant_database_at_another_revision_is_a008(
    audit_db: AuditDatabase, tenant_dbs: list[PgDatabase]
) -> None:
    for db, revision in zip(tenant_dbs, ("r2", "r2", "r1"), strict=True):
        await _set_revision(audit_db, db, revision)
    tenants = [_tenant(f"t{i}", db.app_url) for i, db in enumerate(tenant_dbs)]
    report = await _audit(audit_db, *tenants)
    assert report.codes() == {("A008", tenant_dbs[2].name)}
    await _set_revision(audit_db, tenant_dbs[2], "r2")  # what the upgrade leaves behind
    assert (await _audit(audit_db, *tenants)).findings == ()


async def test_a_tenant_without_a_database_url_is_d005(audit_db: AuditDatabase) -> None:
    tenant = _tenant("acme", None)
    assert (await _audit(audit_db, tenant)).codes() == {("D005", f"tenant {tenant.id}")}


async def test_an_alembic_version_the_tenant_cannot_read_is_a008(
    audit_db: AuditDatabase, tenant_dbs: list[PgDatabase]
) -> None:
    for db in tenant_dbs[:2]:
        await _set_revision(audit_db, db, "r1")
    hidden = tenant_dbs[1]
    tenants = [_tenant(f"t{i}", db.app_url) for i, db in enumerate(tenant_dbs[:2])]
    try:
        await audit_db.sql("REVOKE ALL ON public.alembic_version FROM PUBLIC, tenancy_app",
                           database=hidden.name)  # fmt: skip
        report = await _audit(audit_db, *tenants)
        assert report.codes() == {("A008", hidden.name)}
        assert "(unreadable)" in report.findings[0].message
    finally:
        await audit_db.sql("GRANT SELECT ON public.alembic_version TO tenancy_app",
                           database=hidden.name)  # fmt: skip
