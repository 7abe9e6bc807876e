"""Grant checks against real grants: every finding names a privilege whose statement really
fails as the application role, and its fix (run as the owner) makes that statement pass.

Tables are created by the superuser, whose default privileges (conftest) grant the module's
role everything; each test revokes what it judges. Probes run as the role itself, bound to a
tenant, in a transaction that is rolled back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy import (
    CachedTenantStore,
    HeaderResolver,
    IsolationConfigError,
    TenancyMiddleware,
    Tenant,
    tenant_scope,
)
from asgi_tenancy.checks import Finding
from asgi_tenancy.fastapi import setup_tenancy
from asgi_tenancy.operations import audit
from asgi_tenancy.sqlalchemy import (
    QueryScoping,
    RowLevelSecurity,
    SchemaPerTenant,
    SqlAlchemyTenantStore,
    TenantDatabase,
    tenants_table,
)
from asgi_tenancy.sqlalchemy.grants import DML
from tests.audit.conftest import AuditDatabase, unique
from tests.conftest import PgServer, create_database, drop_database

GRANT_CODES = {"R021", "R022", "S008", "S009", "Q005", "Q006", "D006", "D007", "T001"}


def _role_dsn(db: AuditDatabase) -> str:
    url = make_url(db.role_url()).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@asynccontextmanager
async def _as_role(db: AuditDatabase) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(_role_dsn(db))
    try:
        yield conn
    finally:
        await conn.close()


async def _denied(db: AuditDatabase, sql: str) -> bool:
    """Whether ``sql`` fails for want of a privilege, run as the role in a tenant's transaction."""
    async with _as_role(db) as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute("SELECT set_config('app.tenant_id', 'acme', true)")
            await conn.execute(sql)
        except asyncpg.InsufficientPrivilegeError:
            return True
        finally:
            await transaction.rollback()
    return False


def _grants(findings: list[Finding]) -> dict[tuple[str, str], Finding]:
    return {(f.code, f.subject): f for f in findings if f.code in GRANT_CODES}


async def _check(db: AuditDatabase, strategy: RowLevelSecurity | QueryScoping) -> list[Finding]:
    """The strategy's checks as the role itself (what validate() reads)."""
    engine = create_async_engine(db.role_url(), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return await strategy.check(conn)
    finally:
        await engine.dispose()


async def _rls_schema(db: AuditDatabase, *columns: str) -> tuple[str, RowLevelSecurity]:
    """A schema with one RLS tenant table ``items`` (``id`` + ``columns``) and its policy."""
    schema = unique("g")
    metadata = sa.MetaData()
    table = sa.Table("items", metadata, sa.Column("tenant_id", sa.Text), schema=schema)
    rls = RowLevelSecurity(metadata=metadata)
    await db.sql(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO {db.role}",
        f"CREATE TABLE {schema}.items (tenant_id text NOT NULL{''.join(', ' + c for c in columns)}"
        ")",
        *rls.table_ddl(table),
    )
    return schema, rls


_PROBES = {
    "SELECT": "SELECT count(*) FROM {t}",
    "INSERT": "INSERT INTO {t} (tenant_id) SELECT 'acme' WHERE false",
    "UPDATE": "UPDATE {t} SET tenant_id = 'acme' WHERE false",
    "DELETE": "DELETE FROM {t} WHERE false",
}


async def test_every_missing_dml_grant_is_r021_and_matches_what_fails(
    audit_db: AuditDatabase,
) -> None:
    schema, rls = await _rls_schema(audit_db)
    table = f"{schema}.items"
    subsets = [c for n in range(len(DML) + 1) for c in itertools.combinations(DML, n)]
    for revoked in subsets:
        if revoked:
            await audit_db.sql(f"REVOKE {', '.join(revoked)} ON {table} FROM {audit_db.role}")
        found = _grants(await _check(audit_db, rls))
        denied = {p for p, sql in _PROBES.items() if await _denied(audit_db, sql.format(t=table))}
        assert denied == set(revoked)  # the probes agree with the catalog
        if not revoked:
            assert found == {}
            continue
        finding = found.pop(("R021", table))
        assert found == {}
        assert finding.fix == f"GRANT {', '.join(revoked)} ON {table} TO {audit_db.role}"
        await audit_db.sql(finding.fix)
        assert _grants(await _check(audit_db, rls)) == {}


@pytest.mark.parametrize(
    ("column", "sequence"),
    [
        ("id serial", "items_id_seq"),
        ("id bigserial", "items_id_seq"),
        ("n bigint DEFAULT nextval('{schema}.counter')", "counter"),
        ("n text DEFAULT 'x' || nextval('{schema}.counter')", "counter"),
        ("id int GENERATED ALWAYS AS IDENTITY", None),  # PostgreSQL checks no grant for these
        ("id bigint GENERATED BY DEFAULT AS IDENTITY", None),
    ],
)
async def test_a_sequence_the_insert_draws_from_is_r022_until_granted(
    audit_db: AuditDatabase, column: str, sequence: str | None
) -> None:
    schema = unique("g")
    await audit_db.sql(f"CREATE SCHEMA {schema}", f"CREATE SEQUENCE {schema}.counter")
    metadata = sa.MetaData()
    table = sa.Table("items", metadata, sa.Column("tenant_id", sa.Text), schema=schema)
    rls = RowLevelSecurity(metadata=metadata)
    await audit_db.sql(
        f"GRANT USAGE ON SCHEMA {schema} TO {audit_db.role}",
        f"CREATE TABLE {schema}.items (tenant_id text NOT NULL, {column.format(schema=schema)})",
        *rls.table_ddl(table),
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {audit_db.role}",
    )
    insert = f"INSERT INTO {schema}.items (tenant_id) VALUES ('acme')"
    assert await _denied(audit_db, insert) is (sequence is not None)
    found = _grants(await _check(audit_db, rls))
    if sequence is None:
        assert found == {}
        return
    qualified = f"{schema}.{sequence}"
    assert set(found) == {("R022", qualified)}
    fix = found["R022", qualified].fix
    assert fix == f"GRANT USAGE, SELECT ON SEQUENCE {qualified} TO {audit_db.role}"
    await audit_db.sql(fix)
    assert not await _denied(audit_db, insert)
    assert _grants(await _check(audit_db, rls)) == {}


async def test_shared_tables_need_select_and_their_schema_usage(audit_db: AuditDatabase) -> None:
    schema, _ = await _rls_schema(audit_db)
    metadata = sa.MetaData()
    sa.Table("items", metadata, sa.Column("tenant_id", sa.Text), schema=schema)
    sa.Table("plans", metadata, sa.Column("id", sa.Integer), schema=schema)
    rls = RowLevelSecurity(metadata=metadata, shared_tables={f"{schema}.plans"})
    plans = f"{schema}.plans"
    await audit_db.sql(
        f"CREATE TABLE {plans} (id int)",
        f"REVOKE INSERT, UPDATE, DELETE ON {plans} FROM {audit_db.role}",
    )
    assert _grants(await _check(audit_db, rls)) == {}  # read-only shared data is enough
    await audit_db.sql(f"REVOKE SELECT ON {plans} FROM {audit_db.role}")
    assert await _denied(audit_db, f"SELECT * FROM {plans}")
    found = _grants(await _check(audit_db, rls))
    assert set(found) == {("R021", plans)}
    await audit_db.sql(found["R021", plans].fix)
    await audit_db.sql(f"REVOKE USAGE ON SCHEMA {schema} FROM {audit_db.role}")
    found = _grants(await _check(audit_db, rls))
    assert set(found) == {("R021", schema)}
    assert found["R021", schema].fix == f"GRANT USAGE ON SCHEMA {schema} TO {audit_db.role}"
    await audit_db.sql(found["R021", schema].fix)
    assert _grants(await _check(audit_db, rls)) == {}


async def test_validate_refuses_missing_grants_and_passes_once_fixed(
    audit_db: AuditDatabase,
) -> None:
    schema, rls = await _rls_schema(audit_db, "id serial")
    await audit_db.sql(
        f"REVOKE INSERT ON {schema}.items FROM {audit_db.role}",
        f"REVOKE USAGE ON SEQUENCE {schema}.items_id_seq FROM {audit_db.role}",
    )
    database = TenantDatabase(audit_db.role_url(), rls)
    try:
        with pytest.raises(IsolationConfigError) as caught:
            await database.validate()
        codes = {(f.code, f.subject) for f in caught.value.findings}
        assert {("R021", f"{schema}.items"), ("R022", f"{schema}.items_id_seq")} <= codes
        lines = str(caught.value).splitlines()
        assert any(line.strip().startswith("[R022]") for line in lines)
        await audit_db.sql(*(f.fix for f in caught.value.findings if f.code in GRANT_CODES))
        await database.validate()  # nothing else was wrong
        async with tenant_scope(Tenant("acme")), database.session() as session:
            await session.execute(
                sa.text(f"INSERT INTO {schema}.items (tenant_id) VALUES ('acme')")
            )
            await session.commit()
    finally:
        await database.dispose()


async def test_the_catalog_audit_reports_grants_and_audits_the_urls_own_role(
    audit_db: AuditDatabase,
) -> None:
    schema, _ = await _rls_schema(audit_db, "id serial")
    await audit_db.sql(f"REVOKE UPDATE, DELETE ON {schema}.items FROM {audit_db.role}")
    engine = create_async_engine(audit_db.role_url(), poolclass=NullPool)
    try:
        report = await audit(engine, schemas=[schema])  # no app_role: the URL's own
    finally:
        await engine.dispose()
    assert report.app_role == audit_db.role
    found = _grants(list(report.findings))
    assert set(found) == {("R021", f"{schema}.items")}
    assert found["R021", f"{schema}.items"].fix.endswith(f"TO {audit_db.role}")


async def test_query_scoping_validate_reads_grants_on_postgresql(audit_db: AuditDatabase) -> None:
    schema = unique("q")
    metadata = sa.MetaData()
    sa.Table(
        "items",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        schema=schema,
    )
    await audit_db.sql(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO {audit_db.role}",
        f"CREATE TABLE {schema}.items (id serial PRIMARY KEY, tenant_id text NOT NULL)",
        f"REVOKE DELETE ON {schema}.items FROM {audit_db.role}",
        f"REVOKE USAGE ON SEQUENCE {schema}.items_id_seq FROM {audit_db.role}",
    )
    strategy = QueryScoping(metadata=metadata)
    database = TenantDatabase(audit_db.role_url(), strategy)
    try:
        with pytest.raises(IsolationConfigError) as caught:
            await database.validate()
    finally:
        await database.dispose()
        await audit_db.sql(f"DROP SCHEMA {schema} CASCADE")  # no policy: R015 for the others
    assert {(f.code, f.subject) for f in caught.value.findings} == {
        ("Q005", f"{schema}.items"),
        ("Q006", f"{schema}.items_id_seq"),
    }


# -- the tenant registry ---------------------------------------------------------------------


async def test_an_unreadable_registry_is_t001_and_refuses_the_start(
    audit_db: AuditDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    schema, rls = await _rls_schema(audit_db)
    registry = tenants_table(schema=schema)
    await audit_db.sql(
        f"CREATE TABLE {schema}.tenants (id text PRIMARY KEY, status text, attributes jsonb)",
        f"REVOKE SELECT ON {schema}.tenants FROM {audit_db.role}",
    )
    role_engine = create_async_engine(audit_db.role_url(), poolclass=NullPool)
    store = SqlAlchemyTenantStore(role_engine, table=registry)
    database = TenantDatabase(audit_db.role_url(), rls)
    app = FastAPI()
    app.add_middleware(
        TenancyMiddleware, resolvers=[HeaderResolver()], store=CachedTenantStore(store)
    )
    setup_tenancy(app, database=database)
    try:
        [finding] = await store.check()
        assert (finding.code, finding.subject) == ("T001", f"{schema}.tenants")
        assert finding.fix == f"GRANT SELECT ON {schema}.tenants TO {audit_db.role}"
        with (
            caplog.at_level(logging.ERROR, "asgi_tenancy.fastapi"),
            pytest.raises(IsolationConfigError) as caught,
        ):
            async with app.router.lifespan_context(app):
                pass
        assert [f.code for f in caught.value.findings] == ["T001"]
        assert any("[T001]" in record.getMessage() for record in caplog.records)
        await audit_db.sql(finding.fix)
        assert await store.check() == []
        async with app.router.lifespan_context(app):
            assert await store.get("acme") is None  # read as the role: no 503
    finally:
        await database.dispose()
        await role_engine.dispose()


async def test_a_missing_registry_is_t001_naming_its_creation(audit_db: AuditDatabase) -> None:
    engine = create_async_engine(audit_db.role_url(), poolclass=NullPool)
    try:
        store = SqlAlchemyTenantStore(engine, table=tenants_table(name=unique("tenants")))
        [finding] = await store.check()
    finally:
        await engine.dispose()
    assert finding.code == "T001"
    assert "does not exist" in finding.message
    assert "create_tenants_table()" in finding.fix


# -- schema per tenant -------------------------------------------------------------------------


_notes = sa.MetaData()
sa.Table("notes", _notes, sa.Column("id", sa.Integer, primary_key=True), sa.Column("body", sa.Text))


async def _schema_tenants(db: AuditDatabase, strategy: SchemaPerTenant, *ids: str) -> None:
    engine = db.engine()
    try:
        async with engine.begin() as conn:
            for tenant_id in ids:
                await strategy.create_tenant_schema(conn, Tenant(tenant_id), db.role)
    finally:
        await engine.dispose()


async def test_schema_audit_checks_each_tenant_schemas_grants(audit_db: AuditDatabase) -> None:
    strategy = SchemaPerTenant(metadata=_notes, shared_schema=None)
    acme, globex = unique("acme"), unique("globex")
    await _schema_tenants(audit_db, strategy, acme, globex)
    tenants = [Tenant(acme), Tenant(globex)]
    schema = strategy.schema_for(tenants[1])
    assert _grants(list((await audit_db.audit(strategy=strategy, tenants=tenants)).findings)) == {}
    await audit_db.sql(
        f"REVOKE UPDATE ON {schema}.notes FROM {audit_db.role}",
        f"REVOKE USAGE ON SEQUENCE {schema}.notes_id_seq FROM {audit_db.role}",
    )
    report = await audit_db.audit(strategy=strategy, tenants=tenants)
    found = _grants(list(report.findings))
    assert set(found) == {("S008", f"{schema}.notes"), ("S009", f"{schema}.notes_id_seq")}
    await audit_db.sql(*(f.fix for f in found.values()))
    report = await audit_db.audit(strategy=strategy, tenants=tenants)
    assert _grants(list(report.findings)) == {}


async def test_the_catalog_reads_a_schema_database_as_schema_tenancy(
    audit_db: AuditDatabase,
) -> None:
    strategy = SchemaPerTenant(metadata=_notes, shared_schema=None)
    ids = [unique("initech"), unique("umbrella")]
    await _schema_tenants(audit_db, strategy, *ids)
    schemas = [strategy.schema_for(Tenant(i)) for i in ids]
    as_row = await audit_db.audit(schemas=schemas)
    assert {("R011", f"{s}.notes") for s in schemas} <= as_row.codes()  # the false findings
    as_schema = await audit_db.audit(catalog="schema")
    assert as_schema.strategy == "schema"
    assert set(ids) <= set(as_schema.tenants)
    assert not [f for f in as_schema.findings if f.code.startswith("R")]
    assert not [f for f in as_schema.findings if f.subject in schemas]
    await audit_db.sql(f"REVOKE SELECT ON {schemas[0]}.notes FROM {audit_db.role}")
    found = _grants(list((await audit_db.audit(catalog="schema")).findings))
    assert found[("S008", f"{schemas[0]}.notes")].fix.endswith(f"TO {audit_db.role}")


# -- the superuser -----------------------------------------------------------------------------


async def test_the_bootstrap_superuser_is_told_to_use_a_role_of_its_own(
    audit_db: AuditDatabase,
) -> None:
    engine = audit_db.engine()  # the bootstrap superuser of the test server
    try:
        report = await audit(engine, schemas=["no_such_schema"])
    finally:
        await engine.dispose()
    [r001] = [f for f in report.findings if f.code == "R001"]
    assert "NOSUPERUSER" not in r001.fix.split(":")[0]
    assert "ALTER ROLE" not in r001.fix
    assert "CREATE ROLE" in r001.fix


async def test_another_superuser_is_told_alter_role_nosuperuser(audit_db: AuditDatabase) -> None:
    role = unique("su")
    await audit_db.sql(f"CREATE ROLE {role} SUPERUSER")
    engine = audit_db.engine()
    try:
        report = await audit(engine, app_role=role, schemas=["no_such_schema"])
    finally:
        await engine.dispose()
        await audit_db.sql(f"DROP ROLE {role}")
    [r001] = [f for f in report.findings if f.code == "R001"]
    assert r001.fix == f"ALTER ROLE {role} NOSUPERUSER"


# -- database per tenant -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenant_database(pg_server: PgServer, audit_db: AuditDatabase) -> Iterator[tuple[str, str]]:
    """A database marked as a tenant's, with a serial table the module's role has no grant on."""
    db = create_database(pg_server, "grants_tenant")
    tenant_id = unique("hooli")
    try:
        asyncio.run(
            audit_db.sql(
                f"COMMENT ON DATABASE \"{db.name}\" IS 'asgi-tenancy tenant {tenant_id}'",
                "CREATE TABLE public.items (id serial PRIMARY KEY, name text)",
                database=db.name,
            )
        )
        yield db.name, tenant_id
    finally:
        drop_database(pg_server, db)


async def test_the_catalog_reads_marked_databases_for_the_roles_grants(
    audit_db: AuditDatabase, tenant_database: tuple[str, str]
) -> None:
    name, tenant_id = tenant_database
    report = await audit_db.audit(catalog="database")
    assert report.strategy == "database"
    assert tenant_id in report.tenants
    found = {k: f for k, f in _grants(list(report.findings)).items() if k[1].startswith(name)}
    assert set(found) == {
        ("D006", f"{name}.public.items"),
        ("D007", f"{name}.public.items_id_seq"),
    }
    table = found["D006", f"{name}.public.items"]
    assert table.fix == f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.items TO {audit_db.role}"
    await audit_db.sql(*(f.fix for f in found.values()), database=name)
    report = await audit_db.audit(catalog="database")
    assert not [k for k in _grants(list(report.findings)) if k[1].startswith(name)]
