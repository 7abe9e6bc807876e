"""TenantTask on a real broker: a Celery worker process of its own, Redis, PostgreSQL under RLS.

The worker runs once with the threads pool (4 threads) and once with prefork (2 children), each
reused for every job. What jobs wrote is read back through an admin connection.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncEngine

from asgi_tenancy import Tenant, TenantContextError, TenantNotFound, capture, tenant_scope
from asgi_tenancy.celery import HEADER
from tests.conftest import PgDatabase
from tests.jobs import celery_app as worker_app
from tests.jobs.conftest import clear_rows, rows_by_tenant, set_status
from tests.jobs.models import SNAPSHOT_KEYS, SUSPENDED_LATER, TENANTS
from tests.redis_server import RedisServer
from tests.unit.test_celery import _tampered

ROOT = Path(__file__).resolve().parents[2]
JOBS = 1000
WAIT = 120  # seconds: a bound on every wait, far above what the jobs need


@dataclass(frozen=True)
class Worker:
    pool: str
    name: str
    queue: str
    log: Path


@pytest.fixture(scope="module", params=[("threads", 4), ("prefork", 2)], ids=lambda p: p[0])
def celery_worker(
    request: pytest.FixtureRequest, redis_server: RedisServer, jobs_database: PgDatabase
) -> Iterator[Worker]:
    pool, concurrency = request.param
    queue = f"tenancy-jobs-{pool}"
    worker_app.configure(broker=redis_server.url(0), backend=redis_server.url(1), queue=queue)
    name = f"tenancy-{pool}@{socket.gethostname()}"
    log = Path(tempfile.mkstemp(prefix=f"tenancy-celery-{pool}-", suffix=".log")[1])
    env = {
        **os.environ,
        "TENANCY_JOBS_BROKER": redis_server.url(0),
        "TENANCY_JOBS_BACKEND": redis_server.url(1),
        "TENANCY_JOBS_QUEUE": queue,
        "TENANCY_JOBS_APP_URL": jobs_database.app_url,
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable, "-m", "celery", "-A", "tests.jobs.celery_app", "worker",
        "--pool", pool, "--concurrency", str(concurrency), "--queues", queue, "-n", name,
        "--loglevel", "WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    with log.open("wb") as output:  # never a pipe nobody drains
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        # Ready when it answers a job (the first one also opens its database).
        first = worker_app.probe.delay()
        try:
            first.get(timeout=60)
        except Exception as exc:
            raise RuntimeError(f"celery worker did not start: {exc!r}\n{log.read_text()}") from exc
        yield Worker(pool, name, queue, log)
    finally:
        _stop(process)
        log.unlink(missing_ok=True)
        # Results unsubscribe from Redis when collected: collect them while Redis still runs.
        gc.collect()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # warm shutdown: running jobs finish, then exit
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Prefork children of a killed parent: our own process group, by its id.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _join(results: list[AsyncResult]) -> list[Any]:
    """Each job's return value, or its exception, in order (polling the result keys in bulk)."""
    ids = [r.id for r in results]
    found = dict(worker_app.app.backend.get_many(ids, timeout=WAIT, interval=0.05))
    return [found[i]["result"] for i in ids]


async def test_a_thousand_jobs_of_three_tenants_interleaved_write_only_their_own_rows(
    celery_worker: Worker, admin_engine: AsyncEngine
) -> None:
    await clear_rows(admin_engine)
    sent: list[tuple[str, int, bool]] = []
    tenant_results: list[AsyncResult] = []
    probes: list[AsyncResult] = []
    unscoped: list[AsyncResult] = []
    for n in range(JOBS):
        tenant = TENANTS[n % len(TENANTS)]
        fail = n % 97 == 0  # fails after writing: the next job of that worker must be clean
        with tenant_scope(Tenant(tenant)):
            if n % 2 == 0 or fail:
                tenant_results.append(worker_app.write_rows.delay(n, tenant, fail))
            else:
                tenant_results.append(worker_app.write_rows_async.delay(n, tenant))
        sent.append((tenant, n, fail))
        if n % 5 == 0:
            probes.append(worker_app.probe.delay())
        if n % 50 == 0:
            unscoped.append(worker_app.write_rows.delay(-1 - n, "nobody"))

    done = _join(tenant_results)
    probed = _join(probes)
    refused = _join(unscoped)

    sync_workers = set()
    for (tenant, n, fail), result in zip(sent, done, strict=True):
        if fail:
            assert isinstance(result, Exception), result
            assert "failed after writing" in str(result)
            continue
        assert isinstance(result, dict), (n, result)
        assert result["tenant"] == tenant
        if n % 2 == 0:
            sync_workers.add(tuple(result["where"]))
    assert all(isinstance(r, TenantContextError) for r in refused), refused
    assert all(p["tenant"] is None and not p["central"] for p in probed), probed
    assert {p["data"] for p in probed} == {"refused"}
    # The probes really ran in pool workers that had run tenant jobs before.
    assert {tuple(p["where"]) for p in probed} & sync_workers
    assert len(sync_workers) > 1  # more than one pool worker: the tenants' jobs interleaved

    rows = await rows_by_tenant(admin_engine)
    assert all(owner == expected for owner, expected, _, _ in rows), "a row in another tenant"
    counts = Counter((owner, job, step) for owner, _, job, step in rows)
    expected_rows = {(t, n, step) for t, n, _ in sent for step in (1, 2)}
    assert set(counts) == expected_rows  # none lost, none written without a tenant
    assert set(counts.values()) == {1}  # none duplicated
    assert len(rows) == 2 * JOBS


async def test_a_tampered_snapshot_is_refused_and_writes_nothing(
    celery_worker: Worker, admin_engine: AsyncEngine
) -> None:
    await clear_rows(admin_engine)
    task = worker_app.write_rows.name
    tampered = _tampered(SNAPSHOT_KEYS[0])
    results = [
        worker_app.app.send_task(task, args=(10_000 + i, "acme"), headers={HEADER: snapshot})
        for i, snapshot in enumerate(tampered)
    ]
    with tenant_scope(Tenant("acme")):
        good = capture(key=SNAPSHOT_KEYS[0])
    control = worker_app.app.send_task(task, args=(20_000, "acme"), headers={HEADER: good})
    outcomes = _join([*results, control])
    assert all(isinstance(o, TenantContextError) for o in outcomes[:-1]), outcomes
    assert outcomes[-1]["tenant"] == "acme"  # the same path with an intact snapshot runs
    assert await rows_by_tenant(admin_engine) == [
        ("acme", "acme", 20_000, 1),
        ("acme", "acme", 20_000, 2),
    ]


async def test_a_tenant_suspended_after_enqueue_fails_with_not_found(
    celery_worker: Worker, admin_engine: AsyncEngine
) -> None:
    await clear_rows(admin_engine)
    held = f"{celery_worker.queue}-held"  # no worker consumes it until the tenant is suspended
    with tenant_scope(Tenant(SUSPENDED_LATER)):
        result = worker_app.write_rows.apply_async((30_000, SUSPENDED_LATER), queue=held)
    await set_status(admin_engine, SUSPENDED_LATER, "suspended")
    control = worker_app.app.control
    try:
        replies = control.add_consumer(held, destination=[celery_worker.name], reply=True)
        assert replies, "the worker did not answer the control command"
        outcome = result.get(timeout=WAIT, propagate=False)
    finally:
        control.cancel_consumer(held, destination=[celery_worker.name], reply=True)
        await set_status(admin_engine, SUSPENDED_LATER, "active")
    assert isinstance(outcome, TenantNotFound), outcome
    assert await rows_by_tenant(admin_engine) == []


def test_a_central_task_runs_central_and_reaches_no_tenant_data(celery_worker: Worker) -> None:
    outside = worker_app.central_probe.delay()
    with tenant_scope(Tenant("acme")):
        inside = worker_app.central_probe.delay()
    for outcome in _join([outside, inside]):
        assert outcome == {"tenant": None, "central": True, "data": "refused"}
