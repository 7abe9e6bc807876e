"""JobTenancy without a broker: the serializer and the job wrapper (tests/jobs has the broker)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from asgi_tenancy import (
    InMemoryTenantStore,
    IsolationConfigError,
    Tenant,
    TenantContextError,
    TenantNotFound,
    TenantStatus,
    capture,
    current_tenant,
    current_tenant_or_none,
    tenant_scope,
)
from asgi_tenancy.arq import SNAPSHOT_ARGUMENT, JobTenancy
from asgi_tenancy.context import in_central_scope
from tests.unit.test_celery import KEY, _tampered


@pytest.fixture
def store() -> InMemoryTenantStore:
    return InMemoryTenantStore([Tenant("acme"), Tenant("globex")])


@pytest.fixture
def tenancy(store: InMemoryTenantStore) -> JobTenancy:
    return JobTenancy(store=store, keys=[KEY])


def _job(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"t": None, "f": "whoami", "a": (1,), "k": kwargs, "et": 0}


def _sent(tenancy: JobTenancy, kwargs: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = pickle.loads(tenancy.job_serializer(_job(kwargs)))
    return data


def test_the_serializer_attaches_the_scope_and_only_the_scope(tenancy: JobTenancy) -> None:
    with tenant_scope(Tenant("acme")):
        sent = _sent(tenancy, {"x": 1})
        forged = capture(key=KEY)
    assert sent["k"]["x"] == 1
    assert sent["k"][SNAPSHOT_ARGUMENT]["tenant_id"] == "acme"
    assert _sent(tenancy, {"x": 1}) == _job({"x": 1})
    assert _sent(tenancy, {SNAPSHOT_ARGUMENT: forged}) == _job({})
    with tenant_scope(Tenant("globex")):
        assert _sent(tenancy, {SNAPSHOT_ARGUMENT: forged})["k"][SNAPSHOT_ARGUMENT]["tenant_id"] == (
            "globex"
        )


def test_results_pass_through_untouched(tenancy: JobTenancy) -> None:
    result = {**_job({}), "s": True, "r": 1, "st": 0, "ft": 0, "q": "arq:queue"}
    with tenant_scope(Tenant("acme")):
        assert pickle.loads(tenancy.job_serializer(result)) == result


def _jobs(tenancy: JobTenancy) -> tuple[Any, Any, Any]:
    @tenancy.job
    async def whoami(ctx: dict[str, Any]) -> str | None:
        tenant = current_tenant_or_none()
        ctx["ran"] = True
        return None if tenant is None else tenant.id

    @tenancy.job
    async def fails(ctx: dict[str, Any]) -> None:
        assert current_tenant().id == "acme"
        raise RuntimeError("boom")

    @tenancy.central_job(reason="nightly usage report")
    async def report(ctx: dict[str, Any]) -> bool:
        return in_central_scope() and current_tenant_or_none() is None

    return whoami, fails, report


async def test_a_job_runs_as_its_snapshot_then_leaves_the_scope(tenancy: JobTenancy) -> None:
    whoami, fails, report = _jobs(tenancy)
    with tenant_scope(Tenant("acme")):
        snapshot = _sent(tenancy, {})["k"][SNAPSHOT_ARGUMENT]
    assert await whoami({}, **{SNAPSHOT_ARGUMENT: snapshot}) == "acme"
    assert current_tenant_or_none() is None
    with pytest.raises(RuntimeError, match="boom"):
        await fails({}, **{SNAPSHOT_ARGUMENT: snapshot})
    assert current_tenant_or_none() is None
    assert await whoami({}) is None
    assert await report({}) is True
    assert await report({}, **{SNAPSHOT_ARGUMENT: snapshot}) is True
    assert whoami.__qualname__.endswith("whoami")  # arq registers the job by this name


async def test_a_tenant_suspended_after_enqueue_never_runs(
    tenancy: JobTenancy, store: InMemoryTenantStore
) -> None:
    whoami, _, _ = _jobs(tenancy)
    with tenant_scope(Tenant("acme")):
        snapshot = capture(key=KEY)
    store.put(Tenant("acme", TenantStatus.SUSPENDED))
    ctx: dict[str, Any] = {}
    with pytest.raises(TenantNotFound):
        await whoami(ctx, **{SNAPSHOT_ARGUMENT: snapshot})
    assert "ran" not in ctx


@pytest.mark.parametrize("index", range(len(_tampered())))
async def test_a_tampered_snapshot_never_runs(tenancy: JobTenancy, index: int) -> None:
    whoami, _, _ = _jobs(tenancy)
    ctx: dict[str, Any] = {}
    with pytest.raises(TenantContextError):
        await whoami(ctx, **{SNAPSHOT_ARGUMENT: _tampered()[index]})
    assert "ran" not in ctx


async def test_a_job_never_starts_inside_a_scope(tenancy: JobTenancy) -> None:
    whoami, _, report = _jobs(tenancy)
    async with tenant_scope(Tenant("acme")):
        with pytest.raises(TenantContextError):
            await whoami({})
        with pytest.raises(TenantContextError):
            await report({})


def test_misconfiguration_is_refused_at_start_up(store: InMemoryTenantStore) -> None:
    with pytest.raises(IsolationConfigError):
        JobTenancy(store=store, keys=[b"short"])
    with pytest.raises(IsolationConfigError):
        JobTenancy(store=object(), keys=[KEY])  # type: ignore[arg-type]
    tenancy = JobTenancy(store=store, keys=[KEY])
    with pytest.raises(IsolationConfigError):
        tenancy.central_job(reason=" ")
    with pytest.raises(IsolationConfigError):
        tenancy.job(lambda ctx: None)  # type: ignore[arg-type,return-value]
