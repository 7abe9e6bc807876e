"""How one migration target runs: a picklable job, one transaction, here or in a worker.

Alembic's ``op`` and ``context`` are process-wide module globals, so two migrations can never
run at once in one process (not in threads, not in greenlets). Concurrent runs therefore go to
worker processes (spawned, never forked from a running event loop); a concurrency of 1 runs in
this process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.util
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import sqlalchemy as sa
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ...sqlalchemy.failures import describe
from ...sqlalchemy.migrations import TARGET_KEY, MigrationTarget, read_revision

__all__ = ["LOCK_SQL", "Engines", "Executor", "Job"]

LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('asgi-tenancy migrate ' || :key))"


@dataclass(frozen=True, slots=True)
class Job:
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


def _config_for(job: Job) -> Config:
    config = Config(job.config_file) if job.config_file else Config()
    for key, value in job.main_options:
        config.set_main_option(key, value)
    config.set_main_option("script_location", job.script_location)
    return config


def _alembic_upgrade(sync: Connection, config: Config, job: Job) -> str | None:
    from alembic import command

    sync.execute(sa.text(LOCK_SQL), {"key": job.lock_key})
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
    return read_revision(sync, job.schema)


async def _upgrade(engine: AsyncEngine, config: Config, job: Job) -> str | None:
    """One transaction: the lock, every revision, the version row; all or nothing."""
    async with engine.connect() as conn, conn.begin():
        return await conn.run_sync(_alembic_upgrade, config, job)


class Engines:
    """Small pools by URL, the least recently used disposed past ``limit``: schema tenants
    share the admin URL (one pool for all), each tenant database has its own."""

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self._engines: OrderedDict[str, AsyncEngine] = OrderedDict()

    async def get(self, url: str) -> AsyncEngine:
        engine = self._engines.get(url)
        if engine is None:
            engine = self._engines[url] = create_async_engine(url, pool_size=1, max_overflow=0)
            while len(self._engines) > self.limit:
                _, old = self._engines.popitem(last=False)
                await old.dispose()
        self._engines.move_to_end(url)
        return engine

    async def close(self) -> None:
        for engine in self._engines.values():
            await engine.dispose()
        self._engines.clear()


class _WorkerState:
    """A worker process's event loop and engines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.engines = Engines()
        # Runs when the worker process exits normally: close connections, no EOF in the log.
        multiprocessing.util.Finalize(self, self.close, exitpriority=10)

    def close(self) -> None:
        self.loop.run_until_complete(self.engines.close())
        self.loop.close()


_worker: _WorkerState | None = None


def _upgrade_in_worker(job: Job) -> tuple[str | None, str | None]:
    """Entry point in a worker process: (to_revision, error) for one target."""
    global _worker
    if _worker is None:
        _worker = _WorkerState()
    try:
        engine = _worker.loop.run_until_complete(_worker.engines.get(job.url))
        return _worker.loop.run_until_complete(_upgrade(engine, _config_for(job), job)), None
    except Exception as exc:
        return None, describe(exc)


class Executor:
    """Runs jobs: in this process one at a time (on ``engines``), or in ``workers`` worker
    processes (each with engines of its own)."""

    def __init__(self, workers: int, engines: Engines) -> None:
        self._engines = engines
        self._lock = asyncio.Lock()
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # never fork a running event loop
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)

    async def run(self, job: Job) -> tuple[str | None, str | None]:
        if self._pool is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, _upgrade_in_worker, job)
        async with self._lock:  # Alembic's globals: one migration per process at a time
            try:
                engine = await self._engines.get(job.url)
                return await _upgrade(engine, _config_for(job), job), None
            except Exception as exc:
                return None, describe(exc)

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
