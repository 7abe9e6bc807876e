"""arq jobs that run as the tenant they were enqueued for, or as no tenant (extra: ``arq``).

    tenancy = JobTenancy(store=store, keys=[KEY])

    @tenancy.job
    async def send_invoice(ctx, invoice_id): ...

    redis = await create_pool(settings, job_serializer=tenancy.job_serializer)
    class WorkerSettings:
        functions = [send_invoice]
        job_serializer = tenancy.job_serializer

``enqueue_job`` inside a tenant scope serializes a signed snapshot with the job's arguments; the
job verifies it and loads the tenant through the store before its body runs, and leaves the
scope with the body, on every path (errors, timeouts, aborts).
"""

from __future__ import annotations

import functools
import inspect
import pickle
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import _jobs
from .context import SnapshotKeys
from .errors import IsolationConfigError
from .store import TenantStore

__all__ = ["SNAPSHOT_ARGUMENT", "JobTenancy"]

SNAPSHOT_ARGUMENT = "__asgi_tenancy__"  # the keyword argument the snapshot travels in

_JOB_FIELDS = frozenset({"t", "f", "a", "k", "et"})  # arq's job payload (results carry more)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class JobTenancy:
    """The tenant store and snapshot keys of a set of arq jobs, producers and workers alike.

    ``serializer`` is the payload format underneath (``pickle.dumps`` by default, as arq's);
    give the worker the matching ``job_deserializer`` as usual.
    """

    def __init__(
        self,
        *,
        store: TenantStore,
        keys: SnapshotKeys,
        serializer: Callable[[dict[str, Any]], bytes] | None = None,
    ) -> None:
        self.store = _jobs.check_store(store)
        self._keys = _jobs.signing_keys(keys)
        if serializer is not None and not callable(serializer):
            raise IsolationConfigError("serializer must be a callable (dict) -> bytes")
        self._serializer = serializer or pickle.dumps

    def job_serializer(self, data: dict[str, Any]) -> bytes:
        """arq's ``job_serializer``: adds the current scope's snapshot to a job's arguments."""
        if set(data) == _JOB_FIELDS and isinstance(data["k"], dict):
            kwargs = dict(data["k"])
            kwargs.pop(SNAPSHOT_ARGUMENT, None)  # only the current scope decides what travels
            snapshot = _jobs.outgoing_snapshot(self._keys)
            if snapshot is not None:
                kwargs[SNAPSHOT_ARGUMENT] = snapshot
            data = {**data, "k": kwargs}
        return self._serializer(data)

    def job(self, fn: F) -> F:
        """A job run as the tenant it was enqueued for; enqueued outside a scope, as none."""
        return self._wrap(fn, central=None)

    def central_job(self, *, reason: str) -> Callable[[F], F]:
        """A job run in ``central_scope(reason=...)``, wherever it was enqueued from."""
        checked = _jobs.check_reason(reason)
        return lambda fn: self._wrap(fn, central=checked)

    def _wrap(self, fn: F, *, central: str | None) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise IsolationConfigError("an arq job must be an async function (ctx, ...)")

        @functools.wraps(fn)
        async def job(ctx: Any, *args: Any, **kwargs: Any) -> Any:
            snapshot = kwargs.pop(SNAPSHOT_ARGUMENT, None)
            _jobs.check_clean_start()
            async with _jobs.job_scope(
                snapshot, store=self.store, keys=self._keys, central=central
            ):
                return await fn(ctx, *args, **kwargs)

        return job  # type: ignore[return-value]
