"""Applications the CLI tests load with ``--app tests.audit.apps:NAME``.

Each is a zero-argument factory (the CLI calls it), reading the admin URL and the application
role from the environment the test sets, so nothing connects at import time.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.sqlalchemy import (
    IsolationStrategy,
    RowLevelSecurity,
    SchemaPerTenant,
    create_tenants_table,
    tenants_table,
)

URL_VAR = "TENANCY_AUDIT_TEST_URL"
ROLE_URL_VAR = "TENANCY_AUDIT_TEST_ROLE_URL"  # the application role's own: not an admin
ROLE_VAR = "TENANCY_AUDIT_TEST_ROLE"
SIGNING_KEY = "audit-test-signing-key-0123456789abcdef"

metadata = sa.MetaData()
sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
)
sa.Table("plans", metadata, sa.Column("id", sa.Integer, primary_key=True))


async def create_tables(admin_url: str) -> None:
    """The apps' tables and the tenants registry, created by the owner (a test's set-up)."""
    engine = create_async_engine(admin_url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await create_tenants_table(engine)
    finally:
        await engine.dispose()


def _provisioner(strategy: IsolationStrategy) -> TenantProvisioner:
    engine = create_async_engine(os.environ[URL_VAR], poolclass=NullPool)
    return TenantProvisioner(engine, strategy, app_role=os.environ[ROLE_VAR])


def rls_app() -> TenantProvisioner:
    return _provisioner(RowLevelSecurity(metadata=metadata, shared_tables=["plans"]))


def signed_app() -> TenantProvisioner:
    strategy = RowLevelSecurity(
        metadata=metadata, shared_tables=["plans"], signed=True, signing_keys=[SIGNING_KEY]
    )
    return _provisioner(strategy)


def schema_app() -> TenantProvisioner:
    return _provisioner(SchemaPerTenant(metadata=sa.MetaData()))


def rls_app_without_rights() -> TenantProvisioner:
    """An "admin" engine that is really the application role: it may not create anything."""
    engine = create_async_engine(os.environ[ROLE_URL_VAR], poolclass=NullPool)
    strategy = RowLevelSecurity(metadata=metadata, shared_tables=["plans"])
    return TenantProvisioner(engine, strategy, app_role=os.environ[ROLE_VAR])


def missing_registry_app() -> TenantProvisioner:
    """A registry table nobody created: ``tenants create`` must say so, not trace back."""
    engine = create_async_engine(os.environ[URL_VAR], poolclass=NullPool)
    strategy = RowLevelSecurity(metadata=metadata, shared_tables=["plans"])
    table = tenants_table(name="no_such_tenants")
    return TenantProvisioner(engine, strategy, app_role=os.environ[ROLE_VAR], table=table)


def needs_arguments(url: str) -> TenantProvisioner:
    """A factory the CLI cannot call (it takes an argument)."""
    raise AssertionError("never called with an argument")


def explodes() -> TenantProvisioner:
    raise RuntimeError("the factory's own failure")


NOT_A_PROVISIONER = 42
