"""``migrate_tenants``: the shared branch, then every tenant, each in one transaction.

Where each tenant's tables live comes from the strategy's ``placement`` (a schema on the admin's
server, or a database of its own); around each run the registry marks the tenant ``migrating``
(answered 503 + ``Retry-After``), and the placement's grants are re-applied inside the
transaction, so new tables are usable at once. PostgreSQL's transactional DDL leaves a failed
tenant exactly at its previous revision.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Sequence

import sqlalchemy as sa
from alembic.config import Config
from sqlalchemy.engine import URL, make_url

from ...errors import IsolationConfigError, TenancyError
from ...sqlalchemy.failures import describe
from ...sqlalchemy.migrations import VERSION_TABLE, read_revision
from ...sqlalchemy.placement import Target
from ...sqlalchemy.postgres import qualified_name, quote_ident, quote_literal
from ...tenant import Tenant, TenantStatus
from ..provisioning import TenantProvisioner
from .executor import Engines, Executor, Job
from .plan import Plan, load_config, plan
from .report import MigrationObserver, MigrationReport, MigrationResult, MigrationStatus

__all__ = ["SHARED_ID", "migrate_tenants"]

SHARED_ID = "(shared)"  # the shared target's id in reports and its advisory lock key


# A dry run's prediction for a tenant whose tables exist without a version table.
_UNVERSIONED = (
    "its tables exist but it has no version table: the first migration would fail with "
    "'already exists' (made from metadata? --adopt stamps it at head instead)"
)


def _default_concurrency(provisioner: TenantProvisioner) -> int:
    size = getattr(provisioner.admin_engine.pool, "size", None)
    return max(1, int(size())) if callable(size) else max(1, os.cpu_count() or 1)


def _rendered(url: URL) -> str:
    return url.render_as_string(hide_password=False)


class _Runner:
    """One ``migrate_tenants`` call: the plan, the registry marks, the bounded jobs."""

    def __init__(
        self,
        provisioner: TenantProvisioner,
        config: Config,
        plan: Plan,
        *,
        concurrency: int,
        dry_run: bool,
        observer: MigrationObserver | None,
        database_url: Callable[[Tenant], URL | str] | None,
        lock_timeout: float | None,
        grant: bool,
        adopt: bool,
    ) -> None:
        self.provisioner = provisioner
        self.placement = provisioner.placement
        self.context = provisioner.context
        self.config = config
        self.plan = plan
        self.concurrency = concurrency
        self.dry_run = dry_run
        self.observer = observer
        self.database_url = database_url
        self.grant = grant
        self.adopt = adopt
        self.lock_timeout_ms = None if lock_timeout is None else max(1, round(lock_timeout * 1000))
        self.admin_url = _rendered(provisioner.admin_engine.url)
        self._bound = asyncio.Semaphore(concurrency)
        # (url, schema) -> revision, read once per run: by the prefetch, or on first use.
        self._versions: dict[tuple[str, str | None], str | None] = {}
        self._engines = Engines()  # for reading revisions, and the in-process executor
        self._executor: Executor | None = None

    # placement

    def _target(self, tenant: Tenant) -> tuple[str, str | None]:
        target = self.placement.target(tenant, self.context)
        if target is None:  # pragma: no cover - refused before the run (per_tenant)
            raise IsolationConfigError("this tenant shares the application's tables")
        url = target.url
        if self.database_url is not None and target.schema is None:
            url = make_url(self.database_url(tenant))
        return _rendered(url), target.schema

    def _job(
        self,
        tenant: Tenant | None,
        target: tuple[str, str | None],
        dest: str,
        *,
        stamp: bool = False,
    ) -> Job:
        script_location = self.config.get_main_option("script_location")
        if not script_location:
            raise IsolationConfigError("the Alembic config names no script_location")
        options = tuple(
            (key, value)
            for key, value in self.config.get_section(self.config.config_ini_section, {}).items()
            if key not in ("script_location", "sqlalchemy.url")
        )
        grants = self.placement.grants(tenant, self.context) if self.grant else []
        url, schema = target
        return Job(
            config_file=self.config.config_file_name,
            script_location=script_location,
            url=url,
            lock_key=tenant.id if tenant else SHARED_ID,
            tenant_id=tenant.id if tenant else None,
            schema=schema,
            destination=dest,
            main_options=options,
            lock_timeout_ms=self.lock_timeout_ms,
            grants=tuple(grants),
            stamp=stamp,
        )

    # versions

    async def prefetch(self, tenants: Iterable[Tenant]) -> None:
        """The revision of every tenant schema on the admin's server in two queries: the
        cheap path of a no-op run."""
        wanted: set[str] = set()
        for tenant in tenants:
            try:
                url, schema = self._target(tenant)
            except TenancyError:
                continue  # an unusable name: reported as that tenant's failure later
            if url == self.admin_url and schema is not None:
                wanted.add(schema)
        if not wanted:
            return
        async with self.provisioner.admin_engine.connect() as conn:
            present = (
                await conn.execute(
                    sa.text(
                        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE c.relname = :table"
                        " AND c.relkind = 'r' AND n.nspname = ANY(:schemas)"
                    ),
                    {"table": VERSION_TABLE, "schemas": sorted(wanted)},
                )
            ).scalars()
            found = sorted(present)
            for schema in wanted:
                self._versions[self.admin_url, schema] = None
            for start in range(0, len(found), 500):
                chunk = found[start : start + 500]
                union = " UNION ALL ".join(
                    f"SELECT {quote_literal(s)} AS s, version_num"
                    f" FROM {qualified_name(s, VERSION_TABLE)}"
                    for s in chunk
                )
                rows = (await conn.execute(sa.text(f"{union} ORDER BY 1, 2"))).all()
                grouped: dict[str, list[str]] = {}
                for schema, version in rows:
                    grouped.setdefault(schema, []).append(version)
                for schema in chunk:
                    self._versions[self.admin_url, schema] = (
                        ",".join(grouped.get(schema, [])) or None
                    )

    async def current(self, target: tuple[str, str | None]) -> str | None:
        if target in self._versions:
            return self._versions[target]
        url, schema = target
        engine = (
            self.provisioner.admin_engine if url == self.admin_url else await self._engines.get(url)
        )
        async with engine.connect() as conn:
            revision = await conn.run_sync(read_revision, schema)
        self._versions[target] = revision
        return revision

    # the registry

    async def _mark(self, tenant_id: str) -> bool:
        async with self.provisioner.admin_engine.begin() as conn:
            return await self.provisioner.registry.begin_migration(conn, tenant_id)

    async def _unmark(self, tenant_id: str) -> None:
        async with self.provisioner.admin_engine.begin() as conn:
            await self.provisioner.registry.end_migration(conn, tenant_id)

    async def _unmark_safely(self, tenant_id: str) -> str | None:
        try:
            await self._unmark(tenant_id)
        except Exception as exc:
            return describe(exc)
        return None

    # one tenant

    async def tenant(self, tenant: Tenant) -> MigrationResult | None:
        """Skipped and dry-run results at once; ``None`` when the tenant needs a real run."""
        started = time.perf_counter()
        try:
            current = await self.current(self._target(tenant))
        except Exception as exc:
            return self._failed(tenant.id, None, exc, started)
        if current == self.plan.tenant_head:
            if tenant.status is TenantStatus.MIGRATING and not self.dry_run:
                # A run killed between its commit and the registry reset left the mark.
                await self._unmark(tenant.id)
            return MigrationResult(tenant.id, MigrationStatus.SKIPPED, current, current)
        if self.dry_run:
            head = self.plan.tenant_head
            try:
                unversioned = current is None and not self.adopt
                if unversioned and await self._has_tables(self._target(tenant)):
                    return MigrationResult(
                        tenant.id, MigrationStatus.WOULD_FAIL, None, head, _UNVERSIONED
                    )
            except Exception as exc:
                return self._failed(tenant.id, current, exc, started)
            return MigrationResult(tenant.id, MigrationStatus.DRY_RUN, current, head)
        return None

    async def _has_tables(self, target: tuple[str, str | None]) -> bool:
        """Whether the target holds tables (a dry run's question for a tenant without a
        version table: the first migration would meet them)."""
        url, schema = target
        engine = (
            self.provisioner.admin_engine if url == self.admin_url else await self._engines.get(url)
        )
        async with engine.connect() as conn:
            return bool(
                await conn.scalar(
                    sa.text(
                        "SELECT EXISTS (SELECT 1 FROM pg_class c"
                        " JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE c.relkind IN ('r', 'p') AND n.nspname = :schema"
                        " AND c.relname <> :version)"
                    ),
                    {"schema": schema or "public", "version": VERSION_TABLE},
                )
            )

    async def migrate(self, tenant: Tenant) -> MigrationResult:
        async with self._bound:
            return self.report(await self._migrate(tenant))

    def report(self, result: MigrationResult) -> MigrationResult:
        if self.observer is not None:
            self.observer.finished(result)
        return result

    async def _migrate(self, tenant: Tenant) -> MigrationResult:
        started = time.perf_counter()
        current: str | None = None
        try:
            target = self._target(tenant)
            current = await self.current(target)
            stamp = self.adopt and current is None
            job = self._job(tenant, target, self.plan.tenant_head, stamp=stamp)
            marked = False if stamp else await self._mark(tenant.id)  # a stamp changes no table
        except Exception as exc:
            return self._failed(tenant.id, current, exc, started)
        if self.observer is not None:
            self.observer.started(tenant.id)  # marked (if it was active), about to migrate
        try:
            to_revision, error = await self._run(job)
        finally:
            unmark_error = await self._unmark_safely(tenant.id) if marked else None
        elapsed = time.perf_counter() - started
        if error is None and unmark_error is not None:
            # Migrated, but requests still get 503: a re-run finds it at head and resets it.
            error = f"migrated, but the registry still says migrating: {unmark_error}"
            current = to_revision
        if error is not None:
            return MigrationResult(
                tenant.id, MigrationStatus.FAILED, current, current, error, elapsed
            )
        status = MigrationStatus.STAMPED if stamp else MigrationStatus.OK
        return MigrationResult(tenant.id, status, current, to_revision, None, elapsed)

    async def shared(self) -> MigrationResult | None:
        head = self.plan.shared_head
        if head is None:
            return None
        started = time.perf_counter()
        shared: Target = self.placement.shared_target(self.context)
        target = (_rendered(shared.url), shared.schema)
        try:
            current = await self.current(target)
        except Exception as exc:
            return self._failed(SHARED_ID, None, exc, started)
        if current == head:
            return MigrationResult(SHARED_ID, MigrationStatus.SKIPPED, current, current)
        if self.dry_run:
            return MigrationResult(SHARED_ID, MigrationStatus.DRY_RUN, current, head)
        if shared.schema is not None:
            async with self.provisioner.admin_engine.begin() as conn:
                await conn.execute(
                    sa.text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(shared.schema)}")
                )
        try:
            job = self._job(None, target, head)
        except Exception as exc:
            return self._failed(SHARED_ID, current, exc, started)
        # In this process, before the tenants' executor is sized for them.
        executor = Executor(1, self._engines)
        try:
            to_revision, error = await executor.run(job)
        finally:
            await executor.close()
        elapsed = time.perf_counter() - started
        status = MigrationStatus.FAILED if error else MigrationStatus.OK
        return MigrationResult(
            SHARED_ID, status, current, current if error else to_revision, error, elapsed
        )

    def expect(self, jobs: int) -> None:
        """Size the executor for ``jobs`` real runs: no worker processes for one or none."""
        if self._executor is None and jobs > 0:
            self._executor = Executor(min(self.concurrency, jobs), self._engines)

    async def _run(self, job: Job) -> tuple[str | None, str | None]:
        if self._executor is None:
            raise RuntimeError("expect() sizes the executor before any run")
        return await self._executor.run(job)

    async def close(self) -> None:
        if self._executor is not None:
            await self._executor.close()
        await self._engines.close()

    @staticmethod
    def _failed(
        tenant_id: str, current: str | None, exc: BaseException, started: float
    ) -> MigrationResult:
        elapsed = time.perf_counter() - started
        return MigrationResult(
            tenant_id, MigrationStatus.FAILED, current, current, describe(exc), elapsed
        )


async def migrate_tenants(
    provisioner: TenantProvisioner,
    config: Config | str | os.PathLike[str],
    *,
    tenants: Sequence[str] | None = None,
    concurrency: int | None = None,
    canary: int = 0,
    dry_run: bool = False,
    observer: MigrationObserver | None = None,
    database_url: Callable[[Tenant], URL | str] | None = None,
    lock_timeout: float | None = None,
    grant: bool = True,
    adopt: bool = False,
) -> MigrationReport:
    """Migrate the shared schema (if it has a ``shared`` branch), then every tenant to head.

    ``tenants`` limits the run to those ids (all registered tenants otherwise). At most
    ``concurrency`` tenants migrate at once (default: the admin engine's pool size); a tenant
    already at head is skipped after one read of its version table; one tenant's failure never
    stops the others, unless it is one of the first ``canary`` tenants to migrate, in which case
    the rest are left ``not-run``. ``dry_run`` reads revisions and changes nothing.
    ``database_url`` (database-per-tenant) gives a tenant database's owner URL; by default it is
    the tenant's URL with the admin engine's driver and credentials. ``lock_timeout`` (seconds)
    bounds how long a tenant's migration waits for a table lock; past it that tenant fails.
    ``grant`` re-applies the tenant's DML grants after its revisions, so new tables are usable.
    ``adopt`` stamps tenants that have no version table at head instead of migrating them: for
    tenants whose tables ``TenantProvisioner.create_tenant`` made from the current metadata.
    """
    began = time.perf_counter()
    alembic_config = load_config(config)
    the_plan = plan(alembic_config)
    bound = concurrency if concurrency is not None else _default_concurrency(provisioner)
    if not isinstance(bound, int) or bound < 1:
        raise IsolationConfigError("concurrency must be a positive integer")
    if lock_timeout is not None and not lock_timeout > 0:
        raise IsolationConfigError("lock_timeout must be a positive number of seconds")
    if not isinstance(canary, int) or canary < 0:
        raise IsolationConfigError("canary must be zero or a positive integer")
    if not provisioner.placement.per_tenant:
        raise IsolationConfigError(
            "migrate_tenants migrates schema or database tenants, not "
            f"{provisioner.strategy.name!r}",
            hint="with row-level security or query scoping all tenants share one schema: "
            "run alembic upgrade as usual",
        )
    selected = await _select(provisioner, tenants)
    if observer is not None:
        observer.begin(len(selected))
    runner = _Runner(
        provisioner,
        alembic_config,
        the_plan,
        concurrency=bound,
        dry_run=dry_run,
        observer=observer,
        database_url=database_url,
        lock_timeout=lock_timeout,
        grant=grant,
        adopt=adopt,
    )
    results: dict[str, MigrationResult] = {}
    try:
        shared = await runner.shared()
        if shared is not None and shared.status is MigrationStatus.FAILED:
            for tenant in selected:
                results[tenant.id] = runner.report(
                    MigrationResult(
                        tenant.id, MigrationStatus.NOT_RUN, None, None, "the shared schema failed"
                    )
                )
        else:
            await runner.prefetch(selected)
            await _run_all(runner, selected, canary, results)
    finally:
        await runner.close()
    return MigrationReport(
        tuple(results[tenant.id] for tenant in selected),
        the_plan.tenant_head,
        shared,
        dry_run,
        bound,
        time.perf_counter() - began,
    )


async def _select(provisioner: TenantProvisioner, ids: Sequence[str] | None) -> list[Tenant]:
    if ids is None:
        return await provisioner.list_tenants()
    chosen = []
    for tenant_id in ids:
        tenant = await provisioner.get(tenant_id)
        if tenant is None:
            raise IsolationConfigError("no such tenant in the registry", hint=tenant_id)
        chosen.append(tenant)
    return chosen


async def _run_all(
    runner: _Runner, selected: list[Tenant], canary: int, results: dict[str, MigrationResult]
) -> None:
    pending: list[Tenant] = []
    for tenant in selected:
        early = await runner.tenant(tenant)
        if early is None:
            pending.append(tenant)
        else:
            results[tenant.id] = runner.report(early)
    runner.expect(len(pending))
    first, rest = pending[:canary], pending[canary:]
    if first:
        for result in await asyncio.gather(*(runner.migrate(t) for t in first)):
            results[result.tenant_id] = result
        if any(results[t.id].status is MigrationStatus.FAILED for t in first):
            for tenant in rest:
                results[tenant.id] = runner.report(
                    MigrationResult(
                        tenant.id, MigrationStatus.NOT_RUN, None, None, "a canary tenant failed"
                    )
                )
            return
    for result in await asyncio.gather(*(runner.migrate(t) for t in rest)):
        results[result.tenant_id] = result
