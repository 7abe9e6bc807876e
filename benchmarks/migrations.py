"""Migrations across 1,000 tenant schemas: a no-op run and one real migration (add a column).

One database, 1,000 tenant schemas (``SchemaPerTenant``) registered in a ``tenants`` table,
each with an ``items`` table and its own ``alembic_version`` at ``r1``, made with plain DDL in
one ``DO`` block (timed apart). An Alembic project written to a temporary folder uses the
shipped ``env.py``; ``r2`` adds ``items.price``.

- ``noop``: every tenant already at head; ``migrate_tenants`` reads the version tables in two
  queries and skips them, sequential (concurrency 1) and concurrent (CONCURRENCY).
  For scale, a full Alembic run per tenant (what re-running ``alembic upgrade`` per schema
  costs) is timed on SAMPLE tenants and extrapolated to 1,000.
- ``upgrade``: r1 -> r2 on all 1,000, sequential (in-process, one transaction per tenant) and
  concurrent (CONCURRENCY worker processes); the schemas are reset to r1 with DDL in between.
- ``upgrade_waiting``: the same on WAITING_TENANTS tenants with an r2 that also waits
  WAIT_MS on the server (``pg_sleep``), standing for a backfill or an index build: where
  concurrency pays even on a small machine.

Peak RSS of this process and of the largest worker. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.operations.migrations import (
    TARGET_KEY,
    MigrationReport,
    MigrationTarget,
    env_template,
    migrate_tenants,
)
from asgi_tenancy.sqlalchemy import SchemaPerTenant, tenants_table
from benchmarks.common import machine, peak_rss_mb, postgres

TENANTS, CONCURRENCY, SAMPLE = 1000, 4, 100
WAITING_TENANTS, WAIT_MS = 200, 20
DATABASE = "bench_migrations"

_R1 = """
import sqlalchemy as sa
from alembic import op

revision = "r1"
down_revision = None


def upgrade() -> None:
    op.create_table("items", sa.Column("id", sa.Integer, primary_key=True))
"""

_R2 = """
import sqlalchemy as sa
from alembic import op

revision = "r2"
down_revision = "r1"


def upgrade() -> None:
    op.add_column("items", sa.Column("price", sa.Integer, nullable=True))
"""

_CREATE = f"""
DO $bench$
BEGIN
  FOR i IN 0 .. {TENANTS - 1} LOOP
    EXECUTE format('CREATE SCHEMA %I', 'tenant_m' || lpad(i::text, 4, '0'));
    EXECUTE format('CREATE TABLE %I.items (id integer PRIMARY KEY)',
                   'tenant_m' || lpad(i::text, 4, '0'));
    EXECUTE format('CREATE TABLE %I.alembic_version (version_num varchar(32) NOT NULL'
                   ' CONSTRAINT alembic_version_pkc PRIMARY KEY)',
                   'tenant_m' || lpad(i::text, 4, '0'));
    EXECUTE format('INSERT INTO %I.alembic_version VALUES (''r1'')',
                   'tenant_m' || lpad(i::text, 4, '0'));
    INSERT INTO public.tenants (id) VALUES ('m' || lpad(i::text, 4, '0'));
  END LOOP;
END
$bench$
"""

_RESET = f"""
DO $bench$
BEGIN
  FOR i IN 0 .. {TENANTS - 1} LOOP
    EXECUTE format('ALTER TABLE %I.items DROP COLUMN IF EXISTS price',
                   'tenant_m' || lpad(i::text, 4, '0'));
    EXECUTE format('UPDATE %I.alembic_version SET version_num = ''r1''',
                   'tenant_m' || lpad(i::text, 4, '0'));
  END LOOP;
END
$bench$
"""


_R2_WAITING = (
    _R2
    + f"""    op.execute("SELECT pg_sleep({WAIT_MS / 1000})")
"""
)


def _project(root: Path, *revisions: tuple[str, str]) -> Path:
    scripts = root / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(env_template())
    for name, body in revisions:
        (scripts / "versions" / f"{name}.py").write_text(body)
    ini = root / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {scripts}\n")
    return ini


async def _prepare(admin_url: URL) -> tuple[AsyncEngine, float]:
    server = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with server.connect() as conn:
        if not os.environ.get("DATABASE_URL"):  # scratch server: durability buys nothing
            await conn.execute(text("ALTER SYSTEM SET fsync = off"))
            await conn.execute(text("SELECT pg_reload_conf()"))
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
        await conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
    await server.dispose()
    engine = create_async_engine(admin_url.set(database=DATABASE), pool_size=CONCURRENCY)
    started = time.perf_counter()
    async with engine.begin() as conn:
        await conn.run_sync(tenants_table().create)
        await conn.execute(text(_CREATE))
    return engine, round(time.perf_counter() - started, 2)


async def _full_alembic_noop(engine: AsyncEngine, ini: Path) -> float:
    """Seconds per tenant for a complete ``alembic upgrade head`` that finds nothing to do."""
    config = Config(str(ini))

    def upgrade(sync: Connection, tenant: str) -> None:
        config.attributes[TARGET_KEY] = MigrationTarget(sync, tenant, f"tenant_{tenant}")
        command.upgrade(config, "head")

    started = time.perf_counter()
    for i in range(SAMPLE):
        async with engine.connect() as conn, conn.begin():
            await conn.run_sync(upgrade, f"m{i:04d}")
    return (time.perf_counter() - started) / SAMPLE


def _figures(report: MigrationReport) -> dict[str, Any]:
    assert report.ok, report.counts()
    return {"seconds": round(report.duration_s, 2), "counts": report.counts()}


async def main() -> dict[str, Any]:
    with postgres() as admin_url, tempfile.TemporaryDirectory() as folder:
        engine, set_up = await _prepare(admin_url)
        provisioner = TenantProvisioner(
            engine, SchemaPerTenant(shared_schema=None), app_role="postgres"
        )
        at_r1 = _project(Path(folder) / "v1", ("r1", _R1))
        at_r2 = _project(Path(folder) / "v2", ("r1", _R1), ("r2", _R2))
        waiting = _project(Path(folder) / "v2w", ("r1", _R1), ("r2", _R2_WAITING))

        noop = {
            "sequential": _figures(await migrate_tenants(provisioner, at_r1, concurrency=1)),
            "concurrent": _figures(
                await migrate_tenants(provisioner, at_r1, concurrency=CONCURRENCY)
            ),
        }
        per_tenant = await _full_alembic_noop(engine, at_r1)
        upgrade: dict[str, Any] = {}
        for name, bound in (("sequential", 1), ("concurrent", CONCURRENCY)):
            async with engine.begin() as conn:
                await conn.execute(text(_RESET))
            report = await migrate_tenants(provisioner, at_r2, concurrency=bound)
            upgrade[name] = _figures(report)
            assert report.counts()["ok"] == TENANTS
        some = [f"m{i:04d}" for i in range(WAITING_TENANTS)]
        upgrade_waiting: dict[str, Any] = {}
        for name, bound in (("sequential", 1), ("concurrent", CONCURRENCY)):
            async with engine.begin() as conn:
                await conn.execute(text(_RESET))
            report = await migrate_tenants(provisioner, waiting, tenants=some, concurrency=bound)
            upgrade_waiting[name] = _figures(report)
        await engine.dispose()
        server = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        async with server.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
        await server.dispose()

    for figures in (upgrade, upgrade_waiting):
        figures["speedup"] = round(
            figures["sequential"]["seconds"] / figures["concurrent"]["seconds"], 2
        )
    return {
        "benchmark": "migrations",
        "tenants": TENANTS,
        "concurrency": CONCURRENCY,
        "noop": {
            **noop,
            "full_alembic_run_per_tenant_ms": round(per_tenant * 1000, 2),
            "full_alembic_runs_extrapolated_s": round(per_tenant * TENANTS, 1),
            "full_alembic_sample": SAMPLE,
        },
        "upgrade_add_column": upgrade,
        "upgrade_waiting": {
            "tenants": WAITING_TENANTS,
            "server_wait_ms_per_tenant": WAIT_MS,
            **upgrade_waiting,
        },
        "set_up_s": set_up,
        "set_up_method": "one DO block of plain DDL in one transaction",
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_worker_mb": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
