"""What ``asgi-tenancy audit`` and ``asgi-tenancy policy`` do, behind the argument parsing.

A database URL may carry a password, and drivers echo it (or the host) in their messages: no
error raised here repeats the URL or a driver's message, only what failed and the error's type.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ..errors import IsolationConfigError, TenancyUnavailable
from .audit import AuditReport, audit, audit_provisioner
from .provisioning import TenantProvisioner
from .rls import RowLevelSecurity

__all__ = ["PolicyPlan", "run_audit", "run_policy"]


async def run_audit(
    *,
    url: str | None,
    provisioner: TenantProvisioner | None,
    app_role: str | None,
    tenant_column: str,
    shared_tables: Sequence[str],
    schemas: Sequence[str] | None,
) -> AuditReport:
    """Catalog-only with ``url`` and ``app_role``; the whole application with ``provisioner``."""
    if provisioner is not None:
        if url is not None or app_role is not None:
            raise IsolationConfigError(
                "--app brings its own database and role: DATABASE_URL and --app-role are for "
                "the catalog-only audit",
                hint="drop DATABASE_URL and --app-role, or drop --app",
            )
        try:
            await _reach(provisioner.admin_engine)
            with _database_errors():
                return await audit_provisioner(
                    provisioner, schemas=schemas, shared_tables=shared_tables
                )
        finally:
            await provisioner.admin_engine.dispose()
    if url is None or app_role is None:
        raise IsolationConfigError(
            "the catalog-only audit needs DATABASE_URL and --app-role",
            hint="or pass --app module:attribute to audit the application as configured",
        )
    engine = create_async_engine(_postgres_url(url), poolclass=NullPool)
    try:
        await _reach(engine)
        with _database_errors():
            return await audit(
                engine,
                app_role=app_role,
                tenant_column=tenant_column,
                shared_tables=shared_tables,
                schemas=schemas,
            )
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class PolicyPlan:
    """The row-level security DDL of an application, and whether it was applied."""

    statements: tuple[str, ...]
    signed: bool
    applied: bool

    def render(self) -> str:
        text = ";\n\n".join(self.statements) + ";"
        if self.signed and not self.applied:
            text += "\n\n-- signed=True: --apply also installs the signing keys (never printed)"
        return text

    def as_dict(self) -> dict[str, object]:
        return {"statements": list(self.statements), "signed": self.signed, "applied": self.applied}


async def run_policy(provisioner: TenantProvisioner, *, apply: bool) -> PolicyPlan:
    """The RLS DDL for the app's tenant tables; with ``apply``, run in one admin transaction."""
    strategy = provisioner.strategy
    try:
        if not isinstance(strategy, RowLevelSecurity):
            raise IsolationConfigError(
                f"the application's strategy is {strategy.name!r}: only row-level security "
                "has policies",
                hint="asgi-tenancy audit checks the other strategies",
            )
        plan = PolicyPlan(tuple(strategy.ddl()), strategy.signed, apply)
        if apply:
            await _reach(provisioner.admin_engine)
            with _database_errors():
                async with provisioner.admin_engine.begin() as conn:
                    await strategy.install(conn)
        return plan
    finally:
        await provisioner.admin_engine.dispose()


async def _reach(engine: AsyncEngine) -> None:
    """Connect once, so an unreachable server is a clean error and not a driver traceback."""
    try:
        async with engine.connect():
            pass
    except Exception as exc:
        raise TenancyUnavailable(
            f"the database cannot be reached ({type(exc).__name__})",
            hint="check the host, port, database name and credentials",
        ) from None


@contextmanager
def _database_errors() -> Iterator[None]:
    """A database error mid-command: its type and SQLSTATE, never the driver's message."""
    try:
        yield
    except SQLAlchemyError as exc:
        state = getattr(getattr(exc, "orig", None), "sqlstate", None)
        detail = type(exc).__name__ + (f", SQLSTATE {state}" if isinstance(state, str) else "")
        raise TenancyUnavailable(
            f"the database refused a statement ({detail})",
            hint="run it through the Python API (asgi_tenancy.sqlalchemy.audit) for the details",
        ) from None


def _postgres_url(raw: str) -> URL:
    try:
        url = make_url(raw)
    except ArgumentError:
        raise IsolationConfigError(
            "DATABASE_URL is not a database URL", hint="postgresql://user:password@host/database"
        ) from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+asyncpg")
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise IsolationConfigError("the audit reads PostgreSQL catalogs only")
    return url
