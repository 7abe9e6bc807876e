"""Migrations on distributed tenant schemas: ``asgi-tenancy migrate --all`` runs an Alembic
revision that adds a column and a table in each tenant schema on the cluster. Read back as the
admin: the column is on every shard placement (on the workers), the new table joined the
schema's shard group, and the app role reads and writes both at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from io import StringIO
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy import tenant_scope
from asgi_tenancy.cli import main
from asgi_tenancy.operations.provisioning import TenantProvisioner
from asgi_tenancy.sqlalchemy import TenantDatabase
from asgi_tenancy.sqlalchemy.migrations import env_template
from tests.citus.conftest import Cluster
from tests.citus.schema_models import reset, schema_of, schema_provisioner, schema_strategy, seed

pytestmark = pytest.mark.citus

TENANTS = ("acme", "globex")
ROWS = 5
REVISION = "c1_labels"
_REVISION = f'''
import sqlalchemy as sa
from alembic import op

revision = "{REVISION}"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("label", sa.Text, nullable=True))
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
    )
'''


def write_project(root: Path) -> Path:
    scripts = root / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(env_template())
    (scripts / "versions" / f"{REVISION}.py").write_text(_REVISION)
    ini = root / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    return ini


@pytest.fixture
async def provisioner(
    cluster: Cluster, admin: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TenantProvisioner]:
    monkeypatch.setenv("TENANCY_TEST_CITUS_ADMIN_URL", cluster.admin_url)
    await reset(admin, *TENANTS)
    made = schema_provisioner(
        create_async_engine(cluster.admin_url, poolclass=NullPool), cluster.app_role
    )
    for tenant in TENANTS:
        await made.create_tenant(tenant)
    async with admin.begin() as conn:
        for tenant in TENANTS:
            await seed(conn, tenant, ROWS)
    yield made
    await reset(admin, *TENANTS)
    await made.dispose()


def migrate(ini: Path) -> tuple[int, dict[str, object]]:
    out = StringIO()
    status = main(
        [
            *("migrate", "--all", "--json", "--concurrency", "1", "--config", str(ini)),
            *("--app", "tests.citus.app:schema_provisioner"),
        ],
        out,
    )
    return status, json.loads(out.getvalue())


async def test_migrate_all_changes_every_distributed_tenant_schema_on_its_worker(
    cluster: Cluster, admin: AsyncEngine, provisioner: TenantProvisioner, tmp_path: Path
) -> None:
    status, report = await asyncio.to_thread(migrate, write_project(tmp_path))
    assert status == 0, report
    assert {t["tenant_id"]: (t["status"], t["to_revision"]) for t in report["tenants"]} == {  # type: ignore[attr-defined]
        t: ("ok", REVISION) for t in TENANTS
    }
    for tenant in TENANTS:
        schema = schema_of(tenant)
        async with admin.connect() as conn:
            # On each shard placement itself (the workers), not the coordinator's catalogue.
            placements = (
                await conn.execute(
                    text(
                        "SELECT nodeport, success, result FROM run_command_on_placements("
                        ":t, 'SELECT count(label) || ''/'' || count(*) FROM %s')"
                    ),
                    {"t": f"{schema}.accounts"},
                )
            ).all()
            labels = (
                await conn.execute(
                    text(
                        "SELECT p.partmethod::text, p.colocationid = s.colocationid"
                        " FROM pg_dist_partition p, pg_dist_schema s"
                        " WHERE p.logicalrelid = to_regclass(:t)"
                        " AND s.schemaid = to_regnamespace(:s)"
                    ),
                    {"t": f"{schema}.labels", "s": schema},
                )
            ).one()
            version = await conn.scalar(text(f"SELECT version_num FROM {schema}.alembic_version"))
        assert [(p.success, p.result) for p in placements] == [(True, f"0/{ROWS}")]
        assert placements[0].nodeport != cluster.coordinator_port  # a worker holds it
        assert tuple(labels) == ("n", True)  # a single-shard table in the schema's group
        assert version == REVISION

    # The app role uses the new column and table at once (grants re-applied in the migration).
    db = TenantDatabase(cluster.app_url, schema_strategy())
    await db.validate()
    try:
        for tenant in await provisioner.list_tenants():
            async with tenant_scope(tenant), db.session() as s:
                await s.execute(text("UPDATE accounts SET label = 'l-' || name WHERE id = 1"))
                await s.execute(text("INSERT INTO labels VALUES (1, 1)"))
                await s.commit()
    finally:
        await db.dispose()
    for tenant in TENANTS:
        async with admin.connect() as conn:
            read = (
                await conn.execute(
                    text(
                        f"SELECT a.label, count(l.id) FROM {schema_of(tenant)}.accounts a"
                        f" LEFT JOIN {schema_of(tenant)}.labels l ON l.account_id = a.id"
                        " WHERE a.label IS NOT NULL GROUP BY a.label"
                    )
                )
            ).all()
        assert [tuple(r) for r in read] == [(f"l-{tenant}-account-1", 1)]

    again_status, again = await asyncio.to_thread(migrate, tmp_path / "alembic.ini")
    assert again_status == 0
    assert [t["status"] for t in again["tenants"]] == ["skipped"] * len(TENANTS)  # type: ignore[attr-defined]
