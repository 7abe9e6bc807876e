"""The audit with a SchemaPerTenant application: every tenant's schema, complete, alike, its own.

The strategy's own ``check`` runs as the application role with the search_path its sessions
start with, so a role default that reaches a tenant table is found (S003).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from asgi_tenancy import Tenant
from asgi_tenancy.operations import AuditReport, TenantProvisioner, audit_provisioner
from asgi_tenancy.sqlalchemy import SchemaPerTenant, create_tenants_table, tenants_table
from tests.audit.conftest import AuditDatabase, unique

metadata = sa.MetaData()
sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("body", sa.Text, nullable=False, index=True),
)
sa.Table("tags", metadata, sa.Column("id", sa.Integer, primary_key=True))
STRATEGY = SchemaPerTenant(metadata=metadata)


async def _audit(audit_db: AuditDatabase, *tenants: Tenant) -> AuditReport:
    return await audit_db.audit(strategy=STRATEGY, tenants=tenants)


async def _create(audit_db: AuditDatabase, *tenants: Tenant, revision: str | None = "r1") -> None:
    engine = audit_db.engine()
    try:
        async with engine.begin() as conn:
            for tenant in tenants:
                await STRATEGY.create_tenant_schema(conn, tenant, audit_db.role)
                if revision is not None:
                    schema = STRATEGY.schema_for(tenant)
                    await conn.execute(
                        sa.text(f"CREATE TABLE {schema}.alembic_version (version_num text)")
                    )
                    await conn.execute(
                        sa.text(f"INSERT INTO {schema}.alembic_version VALUES (:r)"),
                        {"r": revision},
                    )
    finally:
        await engine.dispose()


def _tenants(*labels: str) -> list[Tenant]:
    return [Tenant(unique(label)) for label in labels]


def _fix(report: AuditReport, code: str, subject: str) -> str:
    [finding] = [f for f in report.findings if (f.code, f.subject) == (code, subject)]
    return finding.fix


async def test_complete_schemas_at_one_revision_yield_no_findings(audit_db: AuditDatabase) -> None:
    tenants = _tenants("acme", "globex")
    await _create(audit_db, *tenants)
    report = await _audit(audit_db, *tenants)
    assert report.findings == ()
    assert report.strategy == "schema"
    assert report.tables == ("notes", "tags")
    assert report.tenants == tuple(t.id for t in tenants)


async def test_a_missing_schema_is_a006_and_its_fix_creates_it_complete(
    audit_db: AuditDatabase,
) -> None:
    [tenant] = _tenants("initech")
    schema = STRATEGY.schema_for(tenant)
    report = await _audit(audit_db, tenant)
    assert report.codes() == {("A006", schema)}
    await audit_db.sql(_fix(report, "A006", schema))
    assert (await _audit(audit_db, tenant)).findings == ()
    # The schema the fix made serves the application role: the grants came with it.
    await audit_db.sql(
        f"SET ROLE {audit_db.role}; INSERT INTO {schema}.notes (id, body) VALUES (1, 'x')"
    )


async def test_a_schema_missing_a_table_is_a007(audit_db: AuditDatabase) -> None:
    tenants = _tenants("acme", "globex")
    await _create(audit_db, *tenants)
    schema = STRATEGY.schema_for(tenants[1])
    await audit_db.sql(f"DROP TABLE {schema}.tags")
    report = await _audit(audit_db, *tenants)
    assert report.codes() == {("A007", schema)}
    assert "tags" in report.findings[0].message
    await audit_db.sql(_fix(report, "A007", schema))
    assert (await _audit(audit_db, *tenants)).findings == ()


async def test_a_schema_at_another_revision_is_a008(audit_db: AuditDatabase) -> None:
    tenants = _tenants("acme", "globex", "initech", "umbrella")
    await _create(audit_db, *tenants[:2], revision="r2")
    await _create(audit_db, tenants[2], revision="r1")
    await _create(audit_db, tenants[3], revision=None)
    behind, unversioned = (STRATEGY.schema_for(t) for t in tenants[2:])
    report = await _audit(audit_db, *tenants)
    assert report.codes() == {("A008", behind), ("A008", unversioned)}
    assert "r2" in _fix(report, "A008", behind)  # upgrade to the others' revision
    # The fix is a migration, not SQL: what the upgrade leaves behind clears the finding.
    await audit_db.sql(
        f"UPDATE {behind}.alembic_version SET version_num = 'r2'",
        f"CREATE TABLE {unversioned}.alembic_version AS SELECT 'r2'::text AS version_num",
    )
    assert (await _audit(audit_db, *tenants)).findings == ()


async def test_schemas_without_alembic_are_not_compared(audit_db: AuditDatabase) -> None:
    tenants = _tenants("acme", "globex")
    await _create(audit_db, *tenants, revision=None)
    assert (await _audit(audit_db, *tenants)).findings == ()


async def test_a_schema_created_for_another_tenant_is_a009(audit_db: AuditDatabase) -> None:
    owner, intruder = _tenants("acme", "globex")
    await _create(audit_db, owner)
    schema = STRATEGY.schema_for(owner)
    placed = Tenant(intruder.id, attributes={"schema": schema})
    report = await _audit(audit_db, placed)
    assert report.codes() == {("A009", schema)}


async def _registry(audit_db: AuditDatabase, *tenants: Tenant) -> TenantProvisioner:
    table = tenants_table(name=unique("tenants"))
    engine = audit_db.engine()
    await create_tenants_table(engine, table)
    async with engine.begin() as conn:
        for tenant in tenants:
            await conn.execute(
                insert(table).values(id=tenant.id, attributes=dict(tenant.attributes))
            )
    return TenantProvisioner(engine, STRATEGY, app_role=audit_db.role, table=table)


async def test_two_tenants_on_one_schema_are_a009_and_the_fix_moves_one(
    audit_db: AuditDatabase,
) -> None:
    first, second = _tenants("acme", "globex")
    schema = STRATEGY.schema_for(first)
    await _create(audit_db, first)
    provisioner = await _registry(audit_db, first, Tenant(second.id, attributes={"schema": schema}))
    try:
        report = await audit_provisioner(provisioner)
        assert report.codes() == {("A009", schema)}
        assert second.id in report.findings[0].message
        await audit_db.sql(_fix(report, "A009", schema))
        report = await audit_provisioner(provisioner)
        [moved] = [t for t in await provisioner.list_tenants() if t.id == second.id]
        # The tenant now has a schema of its own, still to be created: A006, never A009.
        assert report.codes() == {("A006", STRATEGY.schema_for(moved))}
    finally:
        await provisioner.admin_engine.dispose()


async def test_an_unusable_schema_name_is_a011_and_the_fix_renames_it(
    audit_db: AuditDatabase,
) -> None:
    [tenant] = _tenants("acme")
    provisioner = await _registry(audit_db, Tenant(tenant.id, attributes={"schema": "Bad-Name"}))
    try:
        report = await audit_provisioner(provisioner)
        assert report.codes() == {("A011", f"tenant {tenant.id}")}
        await audit_db.sql(_fix(report, "A011", f"tenant {tenant.id}"))
        report = await audit_provisioner(provisioner)
        assert "A011" not in {f.code for f in report.findings}
    finally:
        await provisioner.admin_engine.dispose()


async def test_a_role_search_path_reaching_a_tenant_schema_is_s003(
    audit_db: AuditDatabase,
) -> None:
    [tenant] = _tenants("acme")
    await _create(audit_db, tenant)
    schema = STRATEGY.schema_for(tenant)
    try:
        await audit_db.sql(
            f'ALTER ROLE {audit_db.role} IN DATABASE "{audit_db.name}" SET search_path = {schema}'
        )
        report = await _audit(audit_db, tenant)
        assert {("S003", f"{schema}.notes"), ("S003", f"{schema}.tags")} <= report.codes()
        await audit_db.sql(_fix(report, "S003", f"{schema}.notes"))
        assert (await _audit(audit_db, tenant)).findings == ()
    finally:
        await audit_db.sql(f'ALTER ROLE {audit_db.role} IN DATABASE "{audit_db.name}" RESET ALL')


async def test_a_tenant_table_in_public_is_s002(audit_db: AuditDatabase) -> None:
    [tenant] = _tenants("acme")
    await _create(audit_db, tenant)
    try:
        await audit_db.sql("CREATE TABLE public.tags (id int)")
        report = await _audit(audit_db, tenant)
        assert ("S002", "public.tags") in report.codes()
    finally:
        await audit_db.sql("DROP TABLE public.tags")


async def test_a_hardened_schema_table_without_its_signed_policy_is_a013(
    audit_db: AuditDatabase,
) -> None:
    functions = unique("fn")
    hardened = SchemaPerTenant(
        metadata=metadata,
        hardened=True,
        signing_keys=["audit-hardened-key-0123456789abcdef"],
        function_schema=functions,
    )
    [tenant] = _tenants("hardy")
    schema = hardened.schema_for(tenant)
    await audit_db.sql(
        f"CREATE SCHEMA {functions}", f"GRANT USAGE ON SCHEMA {functions} TO {audit_db.role}"
    )
    engine = audit_db.engine()
    try:
        async with engine.begin() as conn:
            await hardened.install(conn)
            await hardened.create_tenant_schema(conn, tenant, audit_db.role)
    finally:
        await engine.dispose()

    def a013(report: AuditReport) -> set[tuple[str, str]]:
        return {c for c in report.codes() if c[0] == "A013"}

    assert a013(await audit_db.audit(strategy=hardened, tenants=[tenant])) == set()
    await audit_db.sql(f"CREATE TABLE {schema}.extra (id int)")
    report = await audit_db.audit(strategy=hardened, tenants=[tenant])
    assert a013(report) == {("A013", schema)}
    await audit_db.sql(_fix(report, "A013", schema))
    assert a013(await audit_db.audit(strategy=hardened, tenants=[tenant])) == set()
