"""The audit in catalog-only mode: row-level security read from the live catalog.

Every test builds its bad set-up in a schema of its own, audits only that schema, asserts the
finding's code and subject, applies the finding's fix SQL and audits again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_tenancy.operations import AuditReport, audit
from tests.audit.conftest import AuditDatabase, unique


async def _audit(audit_db: AuditDatabase, schema: str, **options: Any) -> AuditReport:
    return await audit_db.audit(schemas=[schema], **options)


async def _fix(audit_db: AuditDatabase, report: AuditReport, code: str, subject: str) -> None:
    [finding] = [f for f in report.findings if (f.code, f.subject) == (code, subject)]
    await audit_db.sql(finding.fix)


@pytest.fixture
async def schema(audit_db: AuditDatabase) -> AsyncIterator[str]:
    """A schema with one tenant table, ``orders``, and no protection at all yet."""
    name = unique("s")
    await audit_db.sql(
        f"CREATE SCHEMA {name}",
        f"GRANT USAGE ON SCHEMA {name} TO {audit_db.role}",
        f"CREATE TABLE {name}.orders (id serial PRIMARY KEY, tenant_id text NOT NULL,"
        " owner text NOT NULL DEFAULT current_user)",
    )
    yield name
    await audit_db.sql(f"DROP SCHEMA {name} CASCADE")


async def _protect(audit_db: AuditDatabase, schema: str) -> None:
    """The library's own set-up for the table: what every finding's fix converges on."""
    await audit_db.sql(
        f"ALTER TABLE {schema}.orders ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {schema}.orders FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY tenancy_isolation ON {schema}.orders USING"
        " (tenant_id = (SELECT public.tenancy_current_tenant()))"
        " WITH CHECK (tenant_id = (SELECT public.tenancy_current_tenant()))",
        f"CREATE INDEX ON {schema}.orders (tenant_id, id)",
    )


async def _own_policy(audit_db: AuditDatabase, schema: str, name: str, predicate: str) -> None:
    """RLS forced and indexed, with a policy of the test's own instead of the library's."""
    await audit_db.sql(
        f"ALTER TABLE {schema}.orders ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {schema}.orders FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY {name} ON {schema}.orders USING ({predicate}) WITH CHECK ({predicate})",
        f"CREATE INDEX ON {schema}.orders (tenant_id)",
    )


async def test_a_protected_table_and_a_declared_shared_table_yield_no_findings(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _protect(audit_db, schema)
    await audit_db.sql(f"CREATE TABLE {schema}.plans (id int PRIMARY KEY)")
    report = await _audit(audit_db, schema, shared_tables=[f"{schema}.plans"])
    assert report.findings == ()
    assert report.ok
    assert report.tables == (f"{schema}.orders",)


async def test_a_policy_reading_the_setting_in_a_sub_select_passes(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _own_policy(
        audit_db, schema, "own", "tenant_id = (SELECT current_setting('app.tenant_id'))"
    )
    assert (await _audit(audit_db, schema)).findings == ()


async def test_missing_role_is_a001_and_its_fix_creates_it(
    audit_db: AuditDatabase, schema: str
) -> None:
    role = unique("nobody")
    engine = audit_db.engine()
    try:
        report = await audit(engine, app_role=role, schemas=[schema])
        assert report.codes() == {("A001", role)}
        await audit_db.sql(report.findings[0].fix)
        report = await audit(engine, app_role=role, schemas=[schema])
        assert "A001" not in {f.code for f in report.findings}
    finally:
        await engine.dispose()
        await audit_db.sql(f"DROP ROLE IF EXISTS {role}")


async def test_superuser_and_bypassrls_role_are_r001_and_r002_fixed_by_their_sql(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _protect(audit_db, schema)
    role = audit_db.role
    try:
        await audit_db.sql(f"ALTER ROLE {role} SUPERUSER BYPASSRLS")
        report = await _audit(audit_db, schema)
        assert {("R001", role), ("R002", role)} <= report.codes()
        await _fix(audit_db, report, "R001", role)
        await _fix(audit_db, report, "R002", role)
        assert (await _audit(audit_db, schema)).findings == ()
    finally:
        await audit_db.sql(f"ALTER ROLE {role} NOSUPERUSER NOBYPASSRLS")


async def test_a_table_owned_through_membership_is_r003(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _protect(audit_db, schema)
    owner = unique("owner")
    try:
        await audit_db.sql(
            f"CREATE ROLE {owner} NOLOGIN",
            f"ALTER TABLE {schema}.orders OWNER TO {owner}",
            f"GRANT {owner} TO {audit_db.role}",
        )
        report = await _audit(audit_db, schema)
        assert ("R003", f"{schema}.orders") in report.codes()
        await audit_db.sql(f"REVOKE {owner} FROM {audit_db.role}")
        assert (await _audit(audit_db, schema)).findings == ()
    finally:
        await audit_db.sql(
            f"ALTER TABLE {schema}.orders OWNER TO CURRENT_USER", f"DROP ROLE {owner}"
        )


async def test_an_unprotected_table_is_r004_r005_r006_a005_and_the_fixes_protect_it(
    audit_db: AuditDatabase, schema: str
) -> None:
    table = f"{schema}.orders"
    report = await _audit(audit_db, schema)
    expected = {("R004", table), ("R005", table), ("R006", table), ("A005", table)}
    assert report.codes() == expected
    await _fix(audit_db, report, "R004", table)  # the library's whole set-up, index included
    assert (await _audit(audit_db, schema)).findings == ()


async def test_a_missing_index_on_the_tenant_column_is_a005(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _protect(audit_db, schema)
    await audit_db.sql(
        f"DROP INDEX {schema}.orders_tenant_id_id_idx",
        f"CREATE INDEX ON {schema}.orders (id, tenant_id)",  # the tenant column second: no use
    )
    report = await _audit(audit_db, schema)
    assert report.codes() == {("A005", f"{schema}.orders")}
    await _fix(audit_db, report, "A005", f"{schema}.orders")
    assert (await _audit(audit_db, schema)).findings == ()


async def test_an_extra_permissive_policy_using_true_is_a002(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _protect(audit_db, schema)
    await audit_db.sql(f"CREATE POLICY open ON {schema}.orders FOR SELECT USING (true)")
    subject = f"{schema}.orders policy open"
    report = await _audit(audit_db, schema)
    assert report.codes() == {("A002", subject)}
    await _fix(audit_db, report, "A002", subject)
    assert (await _audit(audit_db, schema)).findings == ()


async def test_a_restrictive_policy_using_true_is_harmless(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _protect(audit_db, schema)
    await audit_db.sql(
        f"CREATE POLICY narrow ON {schema}.orders AS RESTRICTIVE USING (true) WITH CHECK (true)"
    )
    assert (await _audit(audit_db, schema)).findings == ()


async def test_a_policy_for_another_role_does_not_apply(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _protect(audit_db, schema)
    other = unique("reporting")
    try:
        await audit_db.sql(
            f"CREATE ROLE {other} NOLOGIN",
            f"CREATE POLICY reports ON {schema}.orders FOR SELECT TO {other} USING (true)",
        )
        assert (await _audit(audit_db, schema)).findings == ()
        await audit_db.sql(f"GRANT {other} TO {audit_db.role}")  # now it applies
        report = await _audit(audit_db, schema)
        assert report.codes() == {("A002", f"{schema}.orders policy reports")}
    finally:
        await audit_db.sql(
            f"DROP POLICY IF EXISTS reports ON {schema}.orders", f"DROP ROLE {other}"
        )


@pytest.mark.parametrize(
    ("policy", "predicate", "code"),
    [
        ("mine", "owner = current_user", "A003"),  # reads no tenant at all
        ("tenancy_isolation", "tenant_id = (SELECT current_setting('app.user_id'))", "A003"),
        ("by_row", "tenant_id = current_setting('app.tenant_id')", "A004"),
        ("nested", "tenant_id = lower(current_setting('app.tenant_id', true))", "A004"),
    ],
)
async def test_a_policy_misreading_the_tenant_is_found_and_fixed(
    audit_db: AuditDatabase, schema: str, policy: str, predicate: str, code: str
) -> None:
    await _own_policy(audit_db, schema, policy, predicate)
    subject = f"{schema}.orders policy {policy}"
    report = await _audit(audit_db, schema)
    assert report.codes() == {(code, subject)}
    await _fix(audit_db, report, code, subject)
    assert (await _audit(audit_db, schema)).findings == ()


async def test_a_policy_without_with_check_is_r007(audit_db: AuditDatabase, schema: str) -> None:
    await _protect(audit_db, schema)
    await audit_db.sql(
        f"DROP POLICY tenancy_isolation ON {schema}.orders",
        f"CREATE POLICY tenancy_isolation ON {schema}.orders FOR ALL"
        " USING (tenant_id = (SELECT public.tenancy_current_tenant()))",
    )
    report = await _audit(audit_db, schema)
    assert report.codes() == {("R007", f"{schema}.orders")}
    await _fix(audit_db, report, "R007", f"{schema}.orders")
    assert (await _audit(audit_db, schema)).findings == ()


async def test_a_table_without_the_tenant_column_must_be_declared_shared(
    audit_db: AuditDatabase, schema: str
) -> None:
    await _protect(audit_db, schema)
    await audit_db.sql(f"CREATE TABLE {schema}.plans (id int PRIMARY KEY)")
    report = await _audit(audit_db, schema)
    assert report.codes() == {("R011", f"{schema}.plans")}
    assert (await _audit(audit_db, schema, shared_tables=["plans"])).findings == ()


async def test_a_custom_tenant_column_is_audited(audit_db: AuditDatabase, schema: str) -> None:
    await audit_db.sql(f"CREATE TABLE {schema}.items (id int, org_id text)")
    report = await _audit(audit_db, schema, tenant_column="org_id", shared_tables=["orders"])
    table = f"{schema}.items"
    assert report.codes() == {("R004", table), ("R005", table), ("R006", table), ("A005", table)}
    assert report.tables == (table,)


async def test_a_missing_tenant_function_is_r010(audit_db: AuditDatabase, schema: str) -> None:
    await _protect(audit_db, schema)
    await audit_db.sql(
        f"CREATE SCHEMA {schema}_fn", f"GRANT USAGE ON SCHEMA {schema}_fn TO {audit_db.role}"
    )
    engine = audit_db.engine()
    try:
        from asgi_tenancy.sqlalchemy import RowLevelSecurity

        strategy = RowLevelSecurity(function_schema=f"{schema}_fn")
        report = await audit(engine, app_role=audit_db.role, schemas=[schema], strategy=strategy)
    finally:
        await engine.dispose()
    assert ("R010", f"{schema}_fn.tenancy_current_tenant") in report.codes()


@pytest.mark.parametrize(
    ("kind", "code"),
    [("VIEW", "A012"), ("MATERIALIZED VIEW", "A012"), ("VIEW_INVOKER", None)],
)
async def test_a_view_of_a_tenant_table_is_a012_unless_security_invoker(
    audit_db: AuditDatabase, schema: str, kind: str, code: str | None
) -> None:
    await _protect(audit_db, schema)
    create = "VIEW" if kind == "VIEW_INVOKER" else kind
    options = " WITH (security_invoker = true)" if kind == "VIEW_INVOKER" else ""
    await audit_db.sql(
        f"CREATE {create} {schema}.summary{options} AS"
        f" SELECT tenant_id, count(*) FROM {schema}.orders GROUP BY tenant_id",
        f"GRANT SELECT ON {schema}.summary TO {audit_db.role}",
    )
    report = await _audit(audit_db, schema)
    if code is None:
        assert report.findings == ()
        return
    assert report.codes() == {(code, f"{schema}.summary")}
    await _fix(audit_db, report, code, f"{schema}.summary")
    assert (await _audit(audit_db, schema)).findings == ()
