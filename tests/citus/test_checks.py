"""The Citus findings (C001-C006) on the cluster, read as the application role: each found on
a broken layout or configuration, absent on the correct one, and gone once the test runs the
finding's own fix as the admin; what the fix did is read back through the admin connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy import IsolationConfigError
from asgi_tenancy.checks import Finding
from asgi_tenancy.sqlalchemy import RowLevelSecurity
from tests.citus.conftest import Cluster, admin_sql, row_strategy
from tests.citus.models import SHARED, Base

pytestmark = pytest.mark.citus

PLAIN_DB = "tenancy_citus_plain"


def citus_findings(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.code.startswith("C")]


async def app_check(
    cluster: Cluster, strategy: RowLevelSecurity, database: str | None = None
) -> list[Finding]:
    url = make_url(cluster.app_url)
    if database is not None:
        url = url.set(database=database)
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return citus_findings(await strategy.check(conn))
    finally:
        await engine.dispose()


async def run_fix(url: str, fix: str) -> None:
    """The finding's fix, verbatim, in one simple-protocol message, as the admin."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await conn.execute(fix)
    finally:
        await conn.close()


# -- C004-C006: the layout ------------------------------------------------------------------

BROKEN = ("citus_broken_items", "citus_broken_events", "citus_broken_orders", "citus_broken_rates")


def broken_metadata() -> MetaData:
    """What the application declares: tenant tables keyed on the tenant, one shared table."""
    md = MetaData()
    Table("citus_broken_rates", md, Column("code", String(3), primary_key=True))
    Table(
        "citus_broken_orders",
        md,
        Column("tenant_id", String(63)),
        Column("id", Integer),
        Column("currency", String(3), ForeignKey("citus_broken_rates.code")),
        PrimaryKeyConstraint("tenant_id", "id"),
    )
    Table(
        "citus_broken_items",
        md,
        Column("tenant_id", String(63)),
        Column("id", Integer),
        Column("order_id", Integer),
        PrimaryKeyConstraint("tenant_id", "id"),
        ForeignKeyConstraint(
            ["tenant_id", "order_id"], ["citus_broken_orders.tenant_id", "citus_broken_orders.id"]
        ),
    )
    Table(
        "citus_broken_events",
        md,
        Column("tenant_id", String(63)),
        Column("id", Integer),
        PrimaryKeyConstraint("tenant_id", "id"),
    )
    return md


@pytest.fixture
async def broken(cluster: Cluster) -> AsyncIterator[RowLevelSecurity]:
    """The database as someone left it: keys without the tenant column, the tables local, the
    shared table local, one tenant table distributed by its id."""
    drop = f"DROP TABLE IF EXISTS {', '.join(BROKEN)} CASCADE"
    await admin_sql(
        cluster.admin_url,
        drop,
        "CREATE TABLE citus_broken_rates (code varchar(3) PRIMARY KEY)",
        "CREATE TABLE citus_broken_orders (tenant_id varchar(63) NOT NULL, id int PRIMARY KEY,"
        " currency varchar(3) REFERENCES citus_broken_rates (code))",
        "CREATE TABLE citus_broken_items (tenant_id varchar(63) NOT NULL, id int,"
        " order_id int REFERENCES citus_broken_orders (id), UNIQUE (id),"
        " PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE citus_broken_events (tenant_id varchar(63) NOT NULL, id int,"
        " PRIMARY KEY (tenant_id, id))",
        "SELECT create_distributed_table('citus_broken_events', 'id')",
        "INSERT INTO citus_broken_rates VALUES ('EUR')",
        "INSERT INTO citus_broken_orders VALUES ('acme', 1, 'EUR'), ('globex', 2, 'EUR')",
        "INSERT INTO citus_broken_items VALUES ('acme', 1, 1), ('globex', 2, 2)",
    )
    yield RowLevelSecurity(
        metadata=broken_metadata(), shared_tables={"citus_broken_rates"}, citus=True
    )
    await admin_sql(cluster.admin_url, drop)


async def test_a_broken_layout_is_found_and_each_fix_in_order_mends_it(
    cluster: Cluster, admin: AsyncEngine, broken: RowLevelSecurity
) -> None:
    found = await app_check(cluster, broken)
    assert [(f.code, f.subject) for f in found] == [
        ("C004", "citus_broken_orders.citus_broken_orders_pkey"),
        ("C004", "citus_broken_items.citus_broken_items_id_key"),
        ("C004", "citus_broken_items.citus_broken_items_order_id_fkey"),
        ("C005", "citus_broken_rates"),
        ("C006", "citus_broken_events, citus_broken_orders, citus_broken_items"),
    ]
    for finding in found:
        await run_fix(cluster.admin_url, finding.fix)
    assert await app_check(cluster, broken) == []
    async with admin.connect() as conn:
        layout = dict(
            (
                await conn.execute(
                    text(
                        "SELECT table_name::text, citus_table_type || ':' || distribution_column"
                        " || ':' || colocation_id FROM citus_tables"
                        " WHERE table_name::text LIKE 'citus\\_broken\\_%'"
                    )
                )
            ).all()
        )
        keys = set(
            (
                await conn.execute(
                    text(
                        "SELECT conrelid::regclass::text || ' ' || pg_get_constraintdef(oid)"
                        " FROM pg_constraint WHERE conrelid::regclass::text LIKE"
                        " 'citus\\_broken\\_%' AND contype IN ('p', 'u', 'f')"
                    )
                )
            ).scalars()
        )
        rows = await conn.scalar(
            text(
                "SELECT count(*) FROM citus_broken_items JOIN citus_broken_orders USING (tenant_id)"
            )
        )
    colocation = {v.rsplit(":", 1)[1] for k, v in layout.items() if k != "citus_broken_rates"}
    assert layout["citus_broken_rates"].startswith("reference:")
    assert {k: v.rsplit(":", 1)[0] for k, v in layout.items() if k != "citus_broken_rates"} == {
        t: "distributed:tenant_id" for t in BROKEN if t != "citus_broken_rates"
    }
    assert len(colocation) == 1  # one tenant's rows of every table in one shard group
    assert {
        "citus_broken_orders PRIMARY KEY (tenant_id, id)",
        "citus_broken_items UNIQUE (tenant_id, id)",
        "citus_broken_items FOREIGN KEY (tenant_id, order_id)"
        " REFERENCES citus_broken_orders(tenant_id, id)",
    } <= keys
    assert rows == 2  # the data came along


async def test_the_harness_layout_has_no_citus_finding(
    cluster: Cluster, admin: AsyncEngine
) -> None:
    assert await app_check(cluster, row_strategy()) == []
    async with admin.connect() as conn:
        methods = await conn.scalar(
            text(
                "SELECT string_agg(partmethod::text, '' ORDER BY logicalrelid::text)"
                " FROM pg_dist_partition WHERE logicalrelid::text LIKE 'citus\\_%'"
                " AND logicalrelid::text NOT LIKE 'citus\\_broken\\_%'"
            )
        )
    assert methods == "nhh"  # currencies reference, items and orders hash: what holds


# -- C001: Citus mode without Citus --------------------------------------------------------


@pytest.fixture
async def plain_database(cluster: Cluster) -> AsyncIterator[str]:
    """A database on the coordinator without the extension (as on a plain PostgreSQL)."""
    drop = f"DROP DATABASE IF EXISTS {PLAIN_DB} WITH (FORCE)"
    await admin_sql(cluster.admin_url, drop, f"CREATE DATABASE {PLAIN_DB}")
    yield make_url(cluster.admin_url).set(database=PLAIN_DB).render_as_string(hide_password=False)
    await admin_sql(cluster.admin_url, drop)


async def test_c001_citus_mode_without_the_extension_is_found_and_fixed(
    cluster: Cluster, plain_database: str
) -> None:
    found = await app_check(cluster, row_strategy(), PLAIN_DB)
    assert [f.code for f in found] == ["C001"]
    plain = RowLevelSecurity(metadata=Base.metadata, shared_tables=SHARED)
    assert await app_check(cluster, plain, PLAIN_DB) == []  # plain PostgreSQL, plain mode: fine
    await run_fix(plain_database, found[0].fix)
    engine = create_async_engine(plain_database, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            version = await conn.scalar(
                text("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
            )
    finally:
        await engine.dispose()
    assert version is not None
    assert await app_check(cluster, row_strategy(), PLAIN_DB) == []  # its tables do not exist


# -- C002, C003: a binding the workers cannot use ----------------------------------------------


async def test_c002_distributed_tables_with_the_plain_binding_are_found_and_fixed(
    cluster: Cluster, admin: AsyncEngine
) -> None:
    plain = RowLevelSecurity(metadata=Base.metadata, shared_tables=SHARED)
    found = await app_check(cluster, plain)
    assert [(f.code, f.subject) for f in found] == [("C002", "citus_items, citus_orders")]
    fixed = row_strategy()  # the fix: citus=True, and install() again
    async with admin.begin() as conn:
        await fixed.install(conn)
    assert await app_check(cluster, fixed) == []
    async with admin.connect() as conn:
        quals = set(
            (
                await conn.execute(
                    text(
                        "SELECT qual || ' / ' || with_check FROM pg_policies"
                        " WHERE tablename IN ('citus_orders', 'citus_items')"
                    )
                )
            ).scalars()
        )
    # The shape Citus accepts on distributed tables: no sub-SELECT, and it still raises unbound.
    assert quals == {
        "((tenant_id)::text = tenancy_current_tenant()) / "
        "((tenant_id)::text = tenancy_current_tenant())"
    }


async def test_c003_the_signed_binding_on_distributed_tables_is_found_and_refused(
    cluster: Cluster,
) -> None:
    signed = RowLevelSecurity(
        metadata=Base.metadata, shared_tables=SHARED, signed=True, signing_keys=[b"k" * 32]
    )
    found = await app_check(cluster, signed)
    assert [(f.code, f.subject) for f in found] == [("C003", "citus_items, citus_orders")]
    with pytest.raises(IsolationConfigError):
        RowLevelSecurity(metadata=Base.metadata, citus=True, signed=True, signing_keys=[b"k" * 32])
    assert await app_check(cluster, row_strategy()) == []  # the fix: citus=True, unsigned
