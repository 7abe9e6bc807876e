"""TenantTask in Celery's eager mode: the scope rules without a broker (tests/jobs: with one)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

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
from asgi_tenancy.celery import HEADER, TenantTask, run_async
from asgi_tenancy.context import in_central_scope

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
ran: list[str] = []


@pytest.fixture
def store() -> InMemoryTenantStore:
    return InMemoryTenantStore([Tenant("acme"), Tenant("globex")])


@pytest.fixture
def app(store: InMemoryTenantStore) -> Iterator[Celery]:
    class Task(TenantTask):
        tenant_store = store
        snapshot_keys = (KEY,)

    app = Celery("eager", broker="memory://", task_cls=Task, set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    ran.clear()
    return app


def _tasks(app: Celery) -> dict[str, Any]:
    @app.task
    def whoami() -> str | None:
        ran.append("whoami")
        tenant = current_tenant_or_none()
        return None if tenant is None else tenant.id

    @app.task
    def needs_tenant() -> str:
        ran.append("needs_tenant")
        return current_tenant().id

    @app.task
    async def whoami_async() -> str:
        await asyncio.sleep(0)
        ran.append("whoami_async")
        return current_tenant().id

    @app.task
    def fails() -> None:
        assert current_tenant().id == "acme"
        raise RuntimeError("boom")

    @app.task(central="nightly usage report")
    def report() -> tuple[bool, str | None]:
        tenant = current_tenant_or_none()
        return in_central_scope(), None if tenant is None else tenant.id

    return {
        "whoami": whoami,
        "needs_tenant": needs_tenant,
        "whoami_async": whoami_async,
        "fails": fails,
        "report": report,
    }


def test_a_task_enqueued_in_a_scope_runs_as_that_tenant(app: Celery) -> None:
    tasks = _tasks(app)
    with tenant_scope(Tenant("acme")):
        assert tasks["whoami"].delay().get() == "acme"
    with tenant_scope(Tenant("globex")):
        assert tasks["whoami_async"].delay().get() == "globex"
    assert current_tenant_or_none() is None


def test_a_task_enqueued_outside_a_scope_runs_with_no_tenant(app: Celery) -> None:
    tasks = _tasks(app)
    assert tasks["whoami"].delay().get() is None
    with pytest.raises(TenantContextError):
        tasks["needs_tenant"].delay()


def test_a_snapshot_comes_from_the_scope_never_from_the_caller(app: Celery) -> None:
    tasks = _tasks(app)
    with tenant_scope(Tenant("acme")):
        forged = capture(key=KEY)
    assert tasks["whoami"].apply_async(headers={HEADER: forged}).get() is None
    with tenant_scope(Tenant("globex")):
        assert tasks["whoami"].apply_async(headers={HEADER: forged}).get() == "globex"


def test_a_central_task_runs_central_wherever_it_was_enqueued(app: Celery) -> None:
    tasks = _tasks(app)
    assert tuple(tasks["report"].delay().get()) == (True, None)
    with tenant_scope(Tenant("acme")):
        result = tasks["report"].apply_async(headers={HEADER: capture(key=KEY)})
    assert tuple(result.get()) == (True, None)
    assert not in_central_scope()


def test_a_tenant_suspended_after_enqueue_fails_before_the_body(
    app: Celery, store: InMemoryTenantStore
) -> None:
    tasks = _tasks(app)
    with tenant_scope(Tenant("acme")):
        snapshot = capture(key=KEY)
    store.put(Tenant("acme", TenantStatus.SUSPENDED))
    for name in ("whoami", "whoami_async"):
        with pytest.raises(TenantNotFound):
            tasks[name].apply(headers={HEADER: snapshot})
    store.remove("acme")
    with pytest.raises(TenantNotFound):
        tasks["whoami"].apply(headers={HEADER: snapshot})
    assert ran == []


def _tampered(key: bytes | str = KEY) -> list[object]:
    """Snapshots signed with ``key`` then changed, or never signed with it: all refused."""
    with tenant_scope(Tenant("acme")):
        good = capture(key=key)
        unsigned = capture()
        other_key = capture(key=OTHER_KEY)
    with tenant_scope(Tenant("globex")):
        globex = capture(key=key)
    return [
        {**good, "tenant_id": "globex"},  # redirected, acme's MAC kept
        {**good, "mac": globex["mac"]},  # globex's MAC on acme's id
        {**globex, "tenant_id": "acme"},
        unsigned,
        other_key,
        {**good, "mac": good["mac"].upper()},
        {**good, "mac": ""},
        {**good, "version": 2},
        {**good, "extra": 1},
        {"tenant_id": "acme", "mac": good["mac"]},
        {**good, "tenant_id": "acme\n"},
        {**good, "tenant_id": ["acme"]},
        "acme",
        ["acme"],
        42,
        {},
    ]


@pytest.mark.parametrize("index", range(len(_tampered())))
def test_a_tampered_snapshot_is_refused_before_the_body(app: Celery, index: int) -> None:
    tasks = _tasks(app)
    snapshot = _tampered()[index]
    for name in ("whoami", "whoami_async"):
        with pytest.raises(TenantContextError):
            tasks[name].apply(headers={HEADER: snapshot})
    assert ran == []


def test_the_scope_ends_with_the_task_on_error(app: Celery) -> None:
    tasks = _tasks(app)
    with tenant_scope(Tenant("acme")):
        snapshot = capture(key=KEY)
    with pytest.raises(RuntimeError, match="boom"):
        tasks["fails"].apply(headers={HEADER: snapshot})
    assert current_tenant_or_none() is None
    assert tasks["whoami"].apply().get() is None


def test_nothing_a_job_sets_in_its_context_reaches_the_next(app: Celery) -> None:
    marker: contextvars.ContextVar[str | None] = contextvars.ContextVar("marker", default=None)

    @app.task
    def sets_marker() -> str | None:
        before = marker.get()
        marker.set("left behind")
        return before

    @app.task
    async def sets_marker_async() -> str | None:
        before = marker.get()
        marker.set("left behind")
        return before

    for _ in range(3):
        assert sets_marker.apply().get() is None
        assert sets_marker_async.apply().get() is None
    assert marker.get() is None


def test_a_called_task_is_a_plain_function_call(app: Celery) -> None:
    tasks = _tasks(app)
    assert tasks["whoami"]() is None
    with tenant_scope(Tenant("acme")):
        assert tasks["whoami"]() == "acme"


def test_enqueueing_without_keys_is_a_configuration_error(
    store: InMemoryTenantStore,
) -> None:
    class Unkeyed(TenantTask):
        tenant_store = store

    app = Celery("unkeyed", broker="memory://", task_cls=Unkeyed, set_as_current=False)
    app.conf.task_always_eager = True

    @app.task
    def noop() -> None:
        return None

    with pytest.raises(IsolationConfigError):  # refused at the first enqueue, scope or not
        noop.delay()
    with tenant_scope(Tenant("acme")), pytest.raises(IsolationConfigError):
        noop.delay()


@pytest.mark.parametrize(
    "attributes",
    [
        {"snapshot_keys": [b"short"]},
        {"snapshot_keys": []},
        {"tenant_store": object()},
        {"central": ""},
        {"central": "   "},
        {"central": 3},
    ],
    ids=repr,
)
def test_misconfigured_task_classes_are_refused_when_made(attributes: dict[str, Any]) -> None:
    with pytest.raises(IsolationConfigError):
        type("Bad", (TenantTask,), attributes)


def test_run_async_refuses_to_wait_on_its_own_loop() -> None:
    async def inner() -> None:
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            run_async(coro)

    run_async(inner())


def test_run_async_sees_the_callers_scope_and_changes_none_of_it() -> None:
    async def probe() -> str:
        return current_tenant().id

    with tenant_scope(Tenant("acme")):
        assert run_async(probe()) == "acme"
    with pytest.raises(TenantContextError):
        run_async(probe())
