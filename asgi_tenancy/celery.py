"""Celery tasks that run as the tenant they were enqueued for, or as no tenant (extra: ``celery``).

Subclass ``TenantTask`` with the store and the snapshot keys, and make it the app's task class:

    class Task(TenantTask):
        tenant_store = store
        snapshot_keys = [KEY]

    app = Celery("app", task_cls=Task)

``delay()`` / ``apply_async()`` inside a tenant scope attach a signed snapshot to the message
headers. The worker verifies it and loads the tenant through the store before the body runs, and
the scope ends with the body, on every path. ``async def`` bodies run on one event loop per
worker process (see ``run_async``), so one engine pool serves every pool thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import os
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import celery

from . import _jobs
from .context import SnapshotKeys, central_scope, tenant_scope
from .store import TenantStore

__all__ = ["HEADER", "TenantTask", "run_async"]

HEADER = "asgi_tenancy"  # the message header that carries the snapshot

T = TypeVar("T")


class _JobLoop:
    """One event loop per process, served by a daemon thread, created on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def reset_after_fork(self) -> None:
        # The parent's loop thread does not exist in a forked child (a prefork pool process).
        self._lock = threading.Lock()
        self._loop = None

    def _get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="asgi-tenancy-jobs", daemon=True
                )
                thread.start()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], context: contextvars.Context) -> T:
        loop = self._get()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("run_async() cannot be called from the job loop itself")
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            if done.cancelled():  # the caller gave up before the loop got to it
                coro.close()
                return
            task = loop.create_task(coro, context=context)
            tasks.append(task)
            task.add_done_callback(lambda finished: _settle(finished, done))

        loop.call_soon_threadsafe(start)
        try:
            return done.result()
        except BaseException:
            # Interrupted (a soft time limit, a shutdown): the coroutine must not run on alone.
            if not done.done():
                done.cancel()
                loop.call_soon_threadsafe(lambda: [task.cancel() for task in tasks])
            raise


def _settle(task: asyncio.Task[T], done: concurrent.futures.Future[T]) -> None:
    if task.cancelled():
        done.cancel()
        return
    error = task.exception()
    try:
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(task.result())
    except concurrent.futures.InvalidStateError:
        pass  # the waiting thread gave up (cancelled) in between: nobody reads it


_loop = _JobLoop()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_loop.reset_after_fork)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on this process's job loop, in a copy of the caller's context, and wait.

    For sync task bodies (``run_async(work())`` inside the tenant's scope) and for worker
    start-up or shut-down (``run_async(db.validate())``). ``async def`` tasks use it already.
    """
    return _loop.run(coro, contextvars.copy_context())


def _snapshot(request: Any) -> object:
    headers = getattr(request, "headers", None)
    if isinstance(headers, Mapping) and HEADER in headers:
        return headers[HEADER]
    return request.get(HEADER)  # protocol 2 also lifts custom headers onto the request


class TenantTask(celery.Task):  # type: ignore[misc]
    """A Celery task run in the scope it was enqueued from: a tenant's, central, or none.

    ``tenant_store`` loads the tenant again at run time; ``snapshot_keys`` sign and verify the
    snapshot (the current key first). ``central="reason"`` (a task option) runs the task in
    ``central_scope(reason=...)`` whatever the message says. Any other task enqueued outside a
    tenant scope runs with no tenant, so tenant data paths raise ``TenantContextError``.
    """

    tenant_store: ClassVar[TenantStore | None] = None
    snapshot_keys: ClassVar[SnapshotKeys | None] = None
    central: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Checked when the class is made (a task decorated, a base declared): at start-up.
        if "snapshot_keys" in cls.__dict__ and cls.snapshot_keys is not None:
            _jobs.signing_keys(cls.snapshot_keys)
        if "tenant_store" in cls.__dict__ and cls.tenant_store is not None:
            _jobs.check_store(cls.tenant_store)
        if "central" in cls.__dict__ and cls.central is not None:
            cls.central = _jobs.check_reason(cls.central)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        headers = dict(options.pop("headers", None) or {})
        headers.pop(HEADER, None)  # only the current scope decides what travels
        if self.central is None:
            snapshot = _jobs.outgoing_snapshot(_jobs.signing_keys(self.snapshot_keys))
            if snapshot is not None:
                headers[HEADER] = snapshot
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, headers=headers, **options
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return super().__call__(*args, **kwargs)  # a plain function call, in the caller's scope
        snapshot = _snapshot(request)
        if request.is_eager:
            # Run as a worker would: from an empty context, not inside the caller's scope.
            context = contextvars.Context()
        else:
            _jobs.check_clean_start()
            # A copy of the thread's context (trace context included): nothing a job sets in it
            # can reach the next job this thread runs.
            context = contextvars.copy_context()
        return context.run(self._run_job, snapshot, args, kwargs)

    def _run_job(self, snapshot: object, args: Any, kwargs: Any) -> Any:
        with self._job_scope(snapshot):
            result = super().__call__(*args, **kwargs)
            if inspect.iscoroutine(result):
                result = run_async(result)
            return result

    @contextmanager
    def _job_scope(self, snapshot: object) -> Iterator[None]:
        if self.central is not None:
            with central_scope(reason=self.central):
                yield
            return
        if snapshot is None:
            yield
            return
        tenant = run_async(
            _jobs.load_job_tenant(
                snapshot,
                store=_jobs.check_store(self.tenant_store),
                keys=_jobs.signing_keys(self.snapshot_keys),
            )
        )
        with tenant_scope(tenant):
            yield
