"""What each ``asgi-tenancy`` command does, behind the argument parsing (``asgi_tenancy.cli``).

Commands that act on an application's tenants load its ``TenantProvisioner`` from
``--app module:attribute`` (``load_provisioner``). A database URL may carry a password, and
drivers echo it (or the host) in their messages: no error raised here repeats the URL or a
driver's message, only what failed and the error's type.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ..errors import (
    ConfirmationRequired,
    DatabaseUnavailable,
    IsolationConfigError,
    TenancyUnavailable,
    TenantNotFound,
)
from ..sqlalchemy.failures import sqlstate
from ..tenant import Tenant
from .audit import AuditReport, audit, audit_provisioner
from .migrations import MigrationObserver, MigrationReport, migrate_tenants
from .provisioning import TenantProvisioner

__all__ = [
    "APP_ENV_VAR",
    "PolicyPlan",
    "load_provisioner",
    "run_audit",
    "run_migrate",
    "run_policy",
    "run_tenants",
]

APP_ENV_VAR = "TENANCY_APP"
TenantAction = Literal["list", "show", "create", "suspend", "activate", "drop"]


def load_provisioner(spec: str | None) -> TenantProvisioner:
    """Import ``module:attribute`` and return the ``TenantProvisioner`` it names (or builds)."""
    if not spec:
        raise IsolationConfigError(
            "no application given", hint=f"pass --app module:attribute or set {APP_ENV_VAR}"
        )
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise IsolationConfigError(
            "--app must look like module:attribute", hint="e.g. --app myapp.tenancy:provisioner"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like python -m: the working directory's modules
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        # The module itself, or one it imports: say which, since the spec is on the screen.
        what = (
            "its module" if missing in (None, module_name) else f"a module it imports ({missing})"
        )
        raise IsolationConfigError(
            f"--app cannot be imported: {what} is not found",
            hint="run from the project's directory, or put it on PYTHONPATH",
        ) from None
    except AttributeError:
        raise IsolationConfigError(
            "--app names an attribute its module does not have",
            hint="the part after ':' is an attribute of the module, e.g. tenancy:provisioner",
        ) from None
    except Exception as exc:
        raise IsolationConfigError(
            f"--app's module failed while importing ({type(exc).__name__})",
            hint="import it in Python to see the error: python -c 'import <module>'",
        ) from None
    if callable(target) and not isinstance(target, TenantProvisioner):
        try:
            target = target()
        except Exception as exc:
            hint = "call it in Python to see the error"
            if isinstance(exc, TypeError):
                hint = "it must take no arguments and return a TenantProvisioner"
            raise IsolationConfigError(
                f"--app's factory failed ({type(exc).__name__})", hint=hint
            ) from None
    if not isinstance(target, TenantProvisioner):
        raise IsolationConfigError(
            f"--app names an object of type {type(target).__name__}, not a TenantProvisioner",
            hint="point it at a TenantProvisioner, or a function returning one",
        )
    return target


async def run_tenants(
    provisioner: TenantProvisioner,
    action: TenantAction,
    tenant_id: str | None = None,
    *,
    attributes: Mapping[str, str] | None = None,
    confirm: bool = False,
) -> list[Tenant]:
    """One ``tenants`` action; the tenants it shows (none after ``drop``)."""
    try:
        await _reach(provisioner.admin_engine)
        with _database_errors(), _registry_missing(provisioner):
            return await _tenant_action(provisioner, action, tenant_id, attributes, confirm)
    finally:
        await provisioner.strategy.dispose()
        await provisioner.dispose()


async def _tenant_action(
    provisioner: TenantProvisioner,
    action: TenantAction,
    tenant_id: str | None,
    attributes: Mapping[str, str] | None,
    confirm: bool,
) -> list[Tenant]:
    if action == "list":
        return await provisioner.list_tenants()
    assert tenant_id is not None
    if action == "show":
        tenant = await provisioner.get(tenant_id)
        if tenant is None:
            raise TenantNotFound()
        return [tenant]
    if action == "create":
        return [await provisioner.create_tenant(tenant_id, dict(attributes or {}))]
    if action == "suspend":
        return [await provisioner.suspend(tenant_id)]
    if action == "activate":
        return [await provisioner.activate(tenant_id)]
    try:
        await provisioner.drop_tenant(tenant_id, confirm=confirm)
    except ConfirmationRequired as exc:
        raise ConfirmationRequired(exc.message, hint="pass --yes") from None
    return []


@contextmanager
def _registry_missing(provisioner: TenantProvisioner) -> Iterator[None]:
    """A missing registry table (SQLSTATE 42P01 on its first use) is a set-up step not taken."""
    try:
        yield
    except SQLAlchemyError as exc:
        if sqlstate(exc) != _UNDEFINED_TABLE:
            raise
        raise IsolationConfigError(
            f"the tenant registry table {provisioner.table.fullname} does not exist",
            hint="create it as the owner: create_tenants_table(), or your first migration",
        ) from None


_UNDEFINED_TABLE = "42P01"


async def run_migrate(
    provisioner: TenantProvisioner,
    config: str,
    *,
    tenants: Sequence[str] | None,
    concurrency: int | None,
    canary: int,
    dry_run: bool,
    observer: MigrationObserver | None,
    lock_timeout: float | None,
    adopt: bool,
) -> MigrationReport:
    """``migrate``: the shared branch and the chosen tenants (``None``: all of them)."""
    try:
        return await migrate_tenants(
            provisioner,
            config,
            tenants=tenants,
            concurrency=concurrency,
            canary=canary,
            dry_run=dry_run,
            observer=observer,
            lock_timeout=lock_timeout,
            adopt=adopt,
        )
    finally:
        await provisioner.admin_engine.dispose()


async def run_audit(
    *,
    url: str | None,
    provisioner: TenantProvisioner | None,
    app_role: str | None,
    tenant_column: str,
    shared_tables: Sequence[str],
    schemas: Sequence[str] | None,
    strategy: str | None = None,
) -> AuditReport:
    """Catalog-only with ``url`` (as ``strategy`` reads it; ``app_role`` defaults to the URL's
    own role); the whole application with ``provisioner``."""
    if provisioner is not None:
        if url is not None or app_role is not None or strategy is not None:
            raise IsolationConfigError(
                "--app brings its own database, role and strategy: DATABASE_URL, --app-role "
                "and --strategy are for the catalog-only audit",
                hint="drop them, or drop --app",
            )
        try:
            await _reach(provisioner.admin_engine)
            with _database_errors():
                return await audit_provisioner(
                    provisioner, schemas=schemas, shared_tables=shared_tables
                )
        finally:
            await provisioner.admin_engine.dispose()
    if url is None:
        raise IsolationConfigError(
            "the audit needs DATABASE_URL (catalog only) or --app",
            hint="--app module:attribute audits the application as configured",
        )
    engine = create_async_engine(_postgres_url(url), poolclass=NullPool)
    try:
        await _reach(engine)
        with _database_errors():
            return await audit(
                engine,
                app_role=app_role,
                catalog=strategy or "row",
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
    """The strategy's DDL (policies, functions); with ``apply``, run in one admin transaction."""
    strategy = provisioner.strategy
    try:
        statements = tuple(strategy.ddl())
        if not statements:
            raise IsolationConfigError(
                f"the application's strategy is {strategy.name!r}: it installs no policies",
                hint="asgi-tenancy audit checks the other strategies",
            )
        plan = PolicyPlan(statements, bool(getattr(strategy, "signed", False)), apply)
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
        raise DatabaseUnavailable(
            f"the database cannot be reached ({type(exc).__name__})",
            hint="check the host, port, database name and credentials",
        ) from None


@contextmanager
def _database_errors() -> Iterator[None]:
    """A database error mid-command: its type and SQLSTATE, never the driver's message."""
    try:
        yield
    except SQLAlchemyError as exc:
        state = sqlstate(exc)
        detail = type(exc).__name__ + (f", SQLSTATE {state}" if state is not None else "")
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
