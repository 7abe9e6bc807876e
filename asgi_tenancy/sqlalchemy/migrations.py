"""Alembic across tenants: the ``env.py`` helper and the ``migrate_tenants`` runner.

Needs the ``migrations`` extra (Alembic). ``env.py`` (``env_template()`` ships one) migrates the
one target the runner hands it in ``config.attributes[TARGET_KEY]``: the shared schema, one tenant
schema (its own ``alembic_version``, tables placed by ``schema_translate_map`` and a
transaction-local ``search_path``) or one tenant database. Each target runs in ONE transaction,
so PostgreSQL's transactional DDL leaves a failed tenant exactly at its previous revision.
Around each run the registry marks the tenant ``migrating`` (answered 503 + ``Retry-After``), and
the tenant's grants are re-applied inside the transaction, so new tables are usable at once.

Alembic's ``op`` and ``context`` are process-wide module globals, so two migrations can never
run at once in one process (not in threads, not in greenlets). Concurrent runs therefore go to
worker processes; a concurrency of 1 runs in this process.
"""

from __future__ import annotations

import asyncio
import enum
import json
import multiprocessing
import multiprocessing.util
import os
import re
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ..errors import IsolationConfigError
from ..tenant import Tenant, TenantStatus
from .database_per_tenant import DatabasePerTenant
from .provisioning import TenantProvisioner
from .schema import SchemaPerTenant
from .schema import _grants as _grant_statements
from .strategy import quote_literal

__all__ = [
    "SHARED_BRANCH",
    "TARGET_KEY",
    "MigrationObserver",
    "MigrationReport",
    "MigrationResult",
    "MigrationStatus",
    "MigrationTarget",
    "describe_error",
    "env_template",
    "migrate_tenants",
    "run_target",
]

TARGET_KEY = "asgi_tenancy.target"
SHARED_BRANCH = "shared"
SHARED_ID = "(shared)"  # the shared target's id in reports and its advisory lock key
_VERSION_TABLE = "alembic_version"
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('asgi-tenancy migrate ' || :key))"


class MigrationStatus(enum.StrEnum):
    """What happened to one tenant."""

    OK = "ok"
    SKIPPED = "skipped"  # already at head: no Alembic run, no registry change
    FAILED = "failed"
    DRY_RUN = "dry-run"  # would migrate; nothing was changed
    STAMPED = "stamped"  # adopted: tables made from metadata, version set to head, no DDL
    NOT_RUN = "not-run"  # left alone because a canary failed


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """One tenant's outcome; ``error`` is the database's message, never a DSN."""

    tenant_id: str
    status: MigrationStatus
    from_revision: str | None
    to_revision: str | None
    error: str | None = None
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """Every tenant's result, in the order of the tenant list; ``shared`` first when run."""

    results: tuple[MigrationResult, ...]
    head: str
    shared: MigrationResult | None = None
    dry_run: bool = False
    concurrency: int = 1
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """No target failed and none was left unrun."""
        bad = (MigrationStatus.FAILED, MigrationStatus.NOT_RUN)
        everything = [*self.results, *([self.shared] if self.shared else [])]
        return not any(result.status in bad for result in everything)

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in MigrationStatus}
        for result in self.results:
            counts[result.status.value] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "head": self.head,
            "dry_run": self.dry_run,
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "counts": self.counts(),
            "shared": None if self.shared is None else _result_dict(self.shared),
            "tenants": [_result_dict(result) for result in self.results],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _result_dict(result: MigrationResult) -> dict[str, Any]:
    body = asdict(result)
    body["status"] = result.status.value
    body["duration_s"] = round(result.duration_s, 4)
    return body


class MigrationObserver(Protocol):
    """Follows a run: how many tenants, each real migration's start (inside the concurrency
    bound), and every tenant's result, skipped ones included."""

    def begin(self, total: int) -> None: ...

    def started(self, tenant_id: str) -> None: ...

    def finished(self, result: MigrationResult) -> None: ...


# -- env.py side -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """What ``env.py`` migrates: a connection already in a transaction, and where to put it.

    ``schema`` is the tenant (or shared) schema, ``None`` for a tenant database, whose default
    schema is used. ``tenant_id`` is ``None`` for the shared target.
    """

    connection: Connection
    tenant_id: str | None
    schema: str | None

    @property
    def shared(self) -> bool:
        return self.tenant_id is None


def run_target(target_metadata: sa.MetaData | None = None, **configure: Any) -> None:
    """Body of ``env.py``: configure Alembic for the runner's target and run its migrations.

    Refuses to run without a target: a plain ``alembic upgrade`` would migrate whatever schema
    the connection happens to search (``public``), never a tenant.
    """
    from alembic import context

    target = context.config.attributes.get(TARGET_KEY)
    if not isinstance(target, MigrationTarget):
        raise IsolationConfigError(
            "this env.py migrates the target asgi-tenancy hands it, and none was given",
            hint="run `asgi-tenancy migrate --all` or `asgi-tenancy migrate TENANT`",
        )
    connection = target.connection
    if target.schema is not None:
        # Raw op.execute() SQL finds the target's tables; the translate map places op.* DDL.
        path = quote_literal(_quote_ident(target.schema))
        connection.exec_driver_sql(f"SELECT set_config('search_path', {path}, true)")
        connection = connection.execution_options(schema_translate_map={None: target.schema})
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table_schema=target.schema,
        transaction_per_migration=False,
        **configure,
    )
    with context.begin_transaction():  # a no-op: the runner's transaction holds the target
        context.run_migrations()


def env_template() -> str:
    """The text of the ``env.py`` shipped with the package: copy it into your script folder."""
    return files("asgi_tenancy.sqlalchemy").joinpath("alembic_env.py.txt").read_text()


def _quote_ident(name: str) -> str:
    """Always quoted (unlike ``strategy.quote_ident``): the schema name exactly as given."""
    return '"' + name.replace('"', '""') + '"'


# -- plan ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where the runner takes each kind of target: tenant head and, if any, shared head."""

    tenant_head: str
    shared_head: str | None


def _plan(config: Config) -> _Plan:
    script = ScriptDirectory.from_config(config)
    heads = set(script.get_heads())
    shared: set[str] = set()
    if any(SHARED_BRANCH in (rev.branch_labels or ()) for rev in script.walk_revisions()):
        shared = {rev.revision for rev in script.get_revisions(f"{SHARED_BRANCH}@head") if rev}
    tenant = heads - shared
    if len(tenant) != 1 or len(shared) > 1:
        raise IsolationConfigError(
            "the tenant migrations must have exactly one head",
            hint="merge the heads (alembic merge heads); shared-schema revisions go on a "
            f"branch labelled {SHARED_BRANCH!r}",
        )
    return _Plan(tenant.pop(), shared.pop() if shared else None)


# -- one target ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    """Everything a worker process needs: picklable, password included (never printed)."""

    config_file: str | None
    script_location: str
    url: str
    lock_key: str
    tenant_id: str | None
    schema: str | None
    destination: str
    main_options: tuple[tuple[str, str], ...] = field(default=())
    lock_timeout_ms: int | None = None
    grants: tuple[str, ...] = ()  # run after the revisions, in the same transaction
    stamp: bool = False  # write the destination as the version, run no revision


def _config_for(job: _Job) -> Config:
    config = Config(job.config_file) if job.config_file else Config()
    for key, value in job.main_options:
        config.set_main_option(key, value)
    config.set_main_option("script_location", job.script_location)
    return config


def _alembic_upgrade(sync: Connection, config: Config, job: _Job) -> str | None:
    from alembic import command

    sync.execute(sa.text(_LOCK_SQL), {"key": job.lock_key})
    if job.lock_timeout_ms is not None:
        # After the advisory lock: only the tenant's own tables are bounded. A request holding
        # one makes this tenant fail (and stay at its revision) instead of queueing every
        # later request behind an ACCESS EXCLUSIVE lock.
        sync.execute(
            sa.text("SELECT set_config('lock_timeout', :ms, true)"),
            {"ms": f"{job.lock_timeout_ms}ms"},
        )
    config.attributes[TARGET_KEY] = MigrationTarget(sync, job.tenant_id, job.schema)
    try:
        if job.stamp:
            command.stamp(config, job.destination)
        else:
            command.upgrade(config, job.destination)
    finally:
        del config.attributes[TARGET_KEY]
    for statement in job.grants:
        sync.exec_driver_sql(statement)
    return _read_version(sync, job.schema)


def _read_version(sync: Connection, schema: str | None) -> str | None:
    table = _quote_ident(_VERSION_TABLE)
    if schema is not None:
        table = f"{_quote_ident(schema)}.{table}"
    exists = sync.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}).scalar()
    if not exists:
        return None
    rows = sync.execute(sa.text(f"SELECT version_num FROM {table} ORDER BY 1")).scalars()
    return ",".join(rows) or None


async def _upgrade(engine: AsyncEngine, config: Config, job: _Job) -> str | None:
    """One transaction: the lock, every revision, the version row; all or nothing."""
    async with engine.connect() as conn, conn.begin():
        return await conn.run_sync(_alembic_upgrade, config, job)


class _WorkerState:
    """A worker process's event loop and engines: one small pool per URL, a few URLs kept.

    Schema tenants share the admin URL, so a worker connects once for all of them; database
    tenants each have their own URL, and the least recently used engine is disposed.
    """

    MAX_ENGINES = 4

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.engines: OrderedDict[str, AsyncEngine] = OrderedDict()
        # Runs when the worker process exits normally: close connections, no EOF in the log.
        multiprocessing.util.Finalize(self, self.close, exitpriority=10)

    def engine(self, url: str) -> AsyncEngine:
        engine = self.engines.get(url)
        if engine is None:
            engine = self.engines[url] = create_async_engine(url, pool_size=1, max_overflow=0)
            while len(self.engines) > self.MAX_ENGINES:
                _, old = self.engines.popitem(last=False)
                self.loop.run_until_complete(old.dispose())
        self.engines.move_to_end(url)
        return engine

    def close(self) -> None:
        for engine in self.engines.values():
            self.loop.run_until_complete(engine.dispose())
        self.engines.clear()
        self.loop.close()


_worker: _WorkerState | None = None


def _upgrade_in_worker(job: _Job) -> tuple[str | None, str | None]:
    """Entry point in a worker process: (to_revision, error) for one target."""
    global _worker
    if _worker is None:
        _worker = _WorkerState()
    try:
        engine = _worker.engine(job.url)
        return _worker.loop.run_until_complete(_upgrade(engine, _config_for(job), job)), None
    except Exception as exc:
        return None, describe_error(exc)


class _Executor:
    """Runs jobs: in this process one at a time, or in ``workers`` worker processes."""

    def __init__(self, workers: int, engine: AsyncEngine) -> None:
        self._engine = engine
        self._lock = asyncio.Lock()
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # never fork a running event loop
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        self._local_engines: dict[str, AsyncEngine] = {}

    async def run(self, job: _Job) -> tuple[str | None, str | None]:
        if self._pool is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, _upgrade_in_worker, job)
        async with self._lock:  # Alembic's globals: one migration per process at a time
            try:
                return await _upgrade(self._engine_for(job.url), _config_for(job), job), None
            except Exception as exc:
                return None, describe_error(exc)

    def _engine_for(self, url: str) -> AsyncEngine:
        if url == self._engine.url.render_as_string(hide_password=False):
            return self._engine
        engine = self._local_engines.get(url)
        if engine is None:
            engine = self._local_engines[url] = create_async_engine(url, poolclass=NullPool)
        return engine

    async def close(self) -> None:
        for engine in self._local_engines.values():
            await engine.dispose()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


_DSN = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^\s/@]*@", re.IGNORECASE)
_BACKGROUND = re.compile(r"\s*\(Background on this error at: [^)]*\)")


def describe_error(exc: BaseException) -> str:
    """One line for the report: the exception's kind and message, credentials removed."""
    source = exc
    inner = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
    if isinstance(inner, BaseException):
        # The adapter wraps asyncpg's own error, whose class names the condition.
        source = inner.__cause__ if isinstance(inner.__cause__, Exception) else inner
    message = str(source).strip().splitlines()[0] if str(source).strip() else ""
    sqlstate = getattr(source, "sqlstate", None)
    if isinstance(sqlstate, str):
        message = f"[{sqlstate}] {message}"
    message = _BACKGROUND.sub("", _DSN.sub(r"\1***@", message))
    if not message and source.__traceback__ is not None:
        # An empty assertion says nothing; where it was raised does (e.g. autocommit_block).
        frame = traceback.extract_tb(source.__traceback__)[-1]
        message = f"raised in {frame.name}() ({Path(frame.filename).name}:{frame.lineno})"
    return f"{type(source).__name__}: {message}"[:500]


# -- the runner ------------------------------------------------------------------------------


def _default_concurrency(engine: AsyncEngine) -> int:
    size = getattr(engine.pool, "size", None)
    return max(1, int(size())) if callable(size) else max(1, os.cpu_count() or 1)


def _database_url(provisioner: TenantProvisioner, tenant: Tenant) -> URL:
    """The tenant database as the owner: its host and name, the admin engine's credentials."""
    strategy = provisioner.strategy
    assert isinstance(strategy, DatabasePerTenant)
    admin = provisioner.admin_engine.url
    return strategy.url_of(tenant).set(
        drivername=admin.drivername, username=admin.username, password=admin.password
    )


class _Runner:
    """One ``migrate_tenants`` call: the plan, the registry marks, the bounded jobs."""

    def __init__(
        self,
        provisioner: TenantProvisioner,
        config: Config,
        plan: _Plan,
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
        self.config = config
        self.plan = plan
        self.concurrency = concurrency
        self.dry_run = dry_run
        self.observer = observer
        self.database_url = database_url
        self.grant = grant
        self.adopt = adopt
        self.lock_timeout_ms = None if lock_timeout is None else max(1, round(lock_timeout * 1000))
        self.admin_url = provisioner.admin_engine.url.render_as_string(hide_password=False)
        self._bound = asyncio.Semaphore(concurrency)
        # (url, schema) -> revision, read once per run: by the prefetch, or on first use.
        self._versions: dict[tuple[str, str | None], str | None] = {}
        self._executor: _Executor | None = None

    # placement

    def _schema(self, tenant: Tenant) -> str | None:
        strategy = self.provisioner.strategy
        if isinstance(strategy, SchemaPerTenant):
            return strategy.schema_for(tenant)
        return None  # a tenant database: its default schema

    def _url(self, tenant: Tenant) -> str:
        if not isinstance(self.provisioner.strategy, DatabasePerTenant):
            return self.admin_url
        url = (
            self.database_url(tenant)
            if self.database_url
            else _database_url(self.provisioner, tenant)
        )
        return make_url(url).render_as_string(hide_password=False)

    def _grants(self, tenant: Tenant | None, schema: str | None) -> tuple[str, ...]:
        """DML on the target's tables for the role that serves it, new tables included.

        The grants ``create_tenant_schema`` gives, re-applied: a table a revision adds is
        committed together with its grant. No grants on a shared target without a schema
        (it would be the registry's ``public``).
        """
        strategy = self.provisioner.strategy
        grantee: str | None = self.provisioner.app_role
        if tenant is not None and isinstance(strategy, SchemaPerTenant):
            grantee = strategy.role_for(tenant) or grantee
        elif tenant is not None and isinstance(strategy, DatabasePerTenant):
            schema = "public"
            grantee = strategy.url_of(tenant).username or grantee
            if grantee == self.provisioner.admin_engine.url.username:
                grantee = None  # the owner needs no grant
        if schema is None or grantee is None:
            return ()
        return tuple(_grant_statements(_quote_ident(schema), _quote_ident(grantee)))

    def _job(
        self,
        tenant: Tenant | None,
        url: str,
        schema: str | None,
        dest: str,
        *,
        stamp: bool = False,
    ) -> _Job:
        script_location = self.config.get_main_option("script_location")
        if not script_location:
            raise IsolationConfigError("the Alembic config names no script_location")
        options = tuple(
            (key, value)
            for key, value in self.config.get_section(self.config.config_ini_section, {}).items()
            if key not in ("script_location", "sqlalchemy.url")
        )
        return _Job(
            config_file=self.config.config_file_name,
            script_location=script_location,
            url=url,
            lock_key=tenant.id if tenant else SHARED_ID,
            tenant_id=tenant.id if tenant else None,
            schema=schema,
            destination=dest,
            main_options=options,
            lock_timeout_ms=self.lock_timeout_ms,
            grants=self._grants(tenant, schema) if self.grant else (),
            stamp=stamp,
        )

    # versions

    async def prefetch_schema_versions(self, schemas: Iterable[str]) -> None:
        """Every tenant schema's revision in two queries: the cheap path of a no-op run."""
        wanted = sorted(set(schemas))
        async with self.provisioner.admin_engine.connect() as conn:
            present = (
                await conn.execute(
                    sa.text(
                        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE c.relname = :table"
                        " AND c.relkind = 'r' AND n.nspname = ANY(:schemas)"
                    ),
                    {"table": _VERSION_TABLE, "schemas": wanted},
                )
            ).scalars()
            found = sorted(present)
            for schema in wanted:
                self._versions[self.admin_url, schema] = None
            for start in range(0, len(found), 500):
                chunk = found[start : start + 500]
                union = " UNION ALL ".join(
                    f"SELECT {quote_literal(s)} AS s, version_num FROM {_quote_ident(s)}."
                    f"{_quote_ident(_VERSION_TABLE)}"
                    for s in chunk
                )
                rows = (await conn.execute(sa.text(f"{union} ORDER BY 1, 2"))).all()
                grouped: dict[str, list[str]] = {}
                for schema, version in rows:
                    grouped.setdefault(schema, []).append(version)
                for schema in chunk:
                    revision = ",".join(grouped.get(schema, [])) or None
                    self._versions[self.admin_url, schema] = revision

    async def current(self, url: str, schema: str | None) -> str | None:
        if (url, schema) in self._versions:
            return self._versions[url, schema]
        engine = self.provisioner.admin_engine
        if url != self.admin_url:
            engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                revision = await conn.run_sync(_read_version, schema)
        finally:
            if engine is not self.provisioner.admin_engine:
                await engine.dispose()
        self._versions[url, schema] = revision
        return revision

    # the registry

    async def _mark(self, tenant_id: str) -> bool:
        """Active (or left migrating by a crashed run) becomes migrating; anything else stays."""
        table = self.provisioner.table
        statement = (
            table.update()
            .where(
                table.c.id == tenant_id,
                table.c.status.in_([TenantStatus.ACTIVE.value, TenantStatus.MIGRATING.value]),
            )
            .values(status=TenantStatus.MIGRATING.value, updated_at=sa.func.now())
            .returning(table.c.id)
        )
        async with self.provisioner.admin_engine.begin() as conn:
            return (await conn.execute(statement)).first() is not None

    async def _unmark_safely(self, tenant_id: str) -> str | None:
        try:
            await self._unmark(tenant_id)
        except Exception as exc:
            return describe_error(exc)
        return None

    async def _unmark(self, tenant_id: str) -> None:
        table = self.provisioner.table
        statement = (
            table.update()
            .where(table.c.id == tenant_id, table.c.status == TenantStatus.MIGRATING.value)
            .values(status=TenantStatus.ACTIVE.value, updated_at=sa.func.now())
        )
        async with self.provisioner.admin_engine.begin() as conn:
            await conn.execute(statement)

    # one tenant

    async def tenant(self, tenant: Tenant) -> MigrationResult | None:
        """Skipped and dry-run results at once; ``None`` when the tenant needs a real run."""
        started = time.perf_counter()
        try:
            schema = self._schema(tenant)
            current = await self.current(self._url(tenant), schema)
        except Exception as exc:
            return self._failed(tenant.id, None, exc, started)
        if current == self.plan.tenant_head:
            if tenant.status is TenantStatus.MIGRATING and not self.dry_run:
                # A run killed between its commit and the registry reset left the mark.
                await self._unmark(tenant.id)
            return MigrationResult(tenant.id, MigrationStatus.SKIPPED, current, current)
        if self.dry_run:
            return MigrationResult(
                tenant.id, MigrationStatus.DRY_RUN, current, self.plan.tenant_head
            )
        return None

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
            schema = self._schema(tenant)
            url = self._url(tenant)
            current = await self.current(url, schema)
            stamp = self.adopt and current is None
            job = self._job(tenant, url, schema, self.plan.tenant_head, stamp=stamp)
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
        strategy = self.provisioner.strategy
        schema = strategy.shared_schema if isinstance(strategy, SchemaPerTenant) else None
        try:
            current = await self.current(self.admin_url, schema)
        except Exception as exc:
            return self._failed(SHARED_ID, None, exc, started)
        if current == head:
            return MigrationResult(SHARED_ID, MigrationStatus.SKIPPED, current, current)
        if self.dry_run:
            return MigrationResult(SHARED_ID, MigrationStatus.DRY_RUN, current, head)
        if schema is not None:
            async with self.provisioner.admin_engine.begin() as conn:
                await conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(schema)}"))
        try:
            job = self._job(None, self.admin_url, schema, head)
        except Exception as exc:
            return self._failed(SHARED_ID, current, exc, started)
        # In this process, before the tenants' executor is sized for them.
        executor = _Executor(1, self.provisioner.admin_engine)
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
            workers = min(self.concurrency, jobs)
            self._executor = _Executor(workers, self.provisioner.admin_engine)

    async def _run(self, job: _Job) -> tuple[str | None, str | None]:
        if self._executor is None:
            raise RuntimeError("expect() sizes the executor before any run")
        return await self._executor.run(job)

    async def close(self) -> None:
        if self._executor is not None:
            await self._executor.close()

    @staticmethod
    def _failed(
        tenant_id: str, current: str | None, exc: BaseException, started: float
    ) -> MigrationResult:
        elapsed = time.perf_counter() - started
        return MigrationResult(
            tenant_id, MigrationStatus.FAILED, current, current, describe_error(exc), elapsed
        )


def _load_config(config: Config | str | os.PathLike[str]) -> Config:
    if isinstance(config, Config):
        return config
    path = Path(config)
    if not path.is_file():
        raise IsolationConfigError("the Alembic config file does not exist", hint=str(path))
    loaded = Config(str(path))
    location = loaded.get_main_option("script_location")
    if location and ":" not in location and not Path(location).is_absolute():
        # Relative to the ini file, wherever the command runs from.
        loaded.set_main_option("script_location", str((path.parent / location).resolve()))
    return loaded


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
    alembic_config = _load_config(config)
    plan = _plan(alembic_config)
    bound = (
        concurrency if concurrency is not None else _default_concurrency(provisioner.admin_engine)
    )
    if not isinstance(bound, int) or bound < 1:
        raise IsolationConfigError("concurrency must be a positive integer")
    if lock_timeout is not None and not lock_timeout > 0:
        raise IsolationConfigError("lock_timeout must be a positive number of seconds")
    if not isinstance(canary, int) or canary < 0:
        raise IsolationConfigError("canary must be zero or a positive integer")
    if not isinstance(provisioner.strategy, SchemaPerTenant | DatabasePerTenant):
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
        plan,
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
            if isinstance(provisioner.strategy, SchemaPerTenant):
                schemas = []
                for tenant in selected:
                    try:
                        schemas.append(provisioner.strategy.schema_for(tenant))
                    except IsolationConfigError:
                        continue  # reported as that tenant's failure below
                await runner.prefetch_schema_versions(schemas)
            await _run_all(runner, selected, canary, results)
    finally:
        await runner.close()
    return MigrationReport(
        tuple(results[tenant.id] for tenant in selected),
        plan.tenant_head,
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
