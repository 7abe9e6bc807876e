"""The tenant context: one private ContextVar holding one immutable scope.

The variable is reached only through ``tenant_scope``, ``central_scope`` and the readers below,
so no code can set a tenant without the nesting rules: the same tenant may be re-entered, any
other change inside a scope raises. Every exit (return, exception, cancellation, generator
close) restores exactly the state that was there before.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec, TypeVar

from ._keys import secret_keys
from .errors import InvalidTenantIdentifier, TenantContextError, TenantNotFound
from .tenant import Tenant, validate_tenant_id

if TYPE_CHECKING:
    from .store import TenantStore

__all__ = [
    "SNAPSHOT_VERSION",
    "bind_context",
    "capture",
    "central_scope",
    "current_tenant",
    "current_tenant_or_none",
    "in_central_scope",
    "restore",
    "tenant_scope",
]

P = ParamSpec("P")
R = TypeVar("R")

SNAPSHOT_VERSION = 1

_audit_log = logging.getLogger("asgi_tenancy.central")


class _Scope(NamedTuple):
    """A tenant scope (``tenant`` set) or the central scope (``reason`` set), never both.

    A named tuple: immutable, and made once per request in a few instructions.
    """

    tenant: Tenant | None
    reason: str | None = None


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "asgi_tenancy.scope", default=None
)


class _ScopeGuard:
    """Enter with ``with`` or ``async with``; each entry is undone by its own exit."""

    __slots__ = ("_stack", "_state")

    def __init__(self, state: _Scope) -> None:
        self._state = state
        self._stack: list[tuple[contextvars.Token[_Scope | None], _Scope | None]] = []

    def _enter(self) -> None:
        current = _scope.get()
        _check_transition(current, self._state)
        if self._state.tenant is None and current is None:
            _audit_log.info("central scope entered: %s", self._state.reason)
        self._stack.append((_scope.set(self._state), current))

    def _exit(self) -> None:
        token, previous = self._stack.pop()
        try:
            _scope.reset(token)
        except ValueError:
            # Exited in another Context than it was entered in (an async generator finalised
            # elsewhere): put back what was there, never leave this scope behind.
            _scope.set(previous)

    def __enter__(self) -> Tenant | None:
        self._enter()
        return self._state.tenant

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit()

    async def __aenter__(self) -> Tenant | None:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit()


class _TenantScope(_ScopeGuard):
    __slots__ = ()

    def __enter__(self) -> Tenant:
        self._enter()
        assert self._state.tenant is not None
        return self._state.tenant

    async def __aenter__(self) -> Tenant:
        return self.__enter__()


def _check_transition(current: _Scope | None, new: _Scope) -> None:
    if current is None:
        return
    if new.tenant is None:
        if current.tenant is None:
            return  # central inside central: still the same kind of work
        raise TenantContextError("central scope cannot be entered inside a tenant scope")
    if current.tenant is None:
        raise TenantContextError("a tenant scope cannot be entered inside the central scope")
    if current.tenant.id != new.tenant.id:
        raise TenantContextError("another tenant's scope cannot be entered inside a tenant scope")


def tenant_scope(tenant: Tenant) -> _TenantScope:
    """Run the enclosed code as ``tenant``: ``with tenant_scope(t):`` or ``async with``.

    Re-entering the same tenant is allowed; entering another tenant, or the central scope,
    inside it raises ``TenantContextError``. A suspended tenant raises ``TenantNotFound``.
    """
    if not isinstance(tenant, Tenant):
        raise TypeError("tenant_scope() takes a Tenant")
    if not tenant.is_active:
        raise TenantNotFound()
    return _TenantScope(_Scope(tenant))


def enter_request(tenant: Tenant) -> contextvars.Token[_Scope | None]:
    """The middleware's own entry: ``tenant_scope``'s rules in one call (no guard object).

    ``tenant`` comes active from the store; the scope is left with ``exit_request(token)``.
    """
    state = _Scope(tenant)
    current = _scope.get()
    if current is not None:
        _check_transition(current, state)
    return _scope.set(state)


def exit_request(token: contextvars.Token[_Scope | None]) -> None:
    _scope.reset(token)


def central_scope(*, reason: str) -> _ScopeGuard:
    """Explicit admin work across tenants, logged with ``reason``.

    Tenant data paths refuse to run inside it: central work goes through an admin engine that
    the application passes explicitly, never through a flag that SQL could set.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("central_scope() needs a non-empty reason")
    return _ScopeGuard(_Scope(None, reason.strip()))


def current_tenant() -> Tenant:
    """The tenant of the current scope; raises ``TenantContextError`` outside a tenant scope."""
    state = _scope.get()
    if state is None:
        raise TenantContextError("no tenant scope is active")
    if state.tenant is None:
        raise TenantContextError("tenant data is not reachable from the central scope")
    return state.tenant


def current_tenant_or_none() -> Tenant | None:
    """The current tenant, or ``None`` outside a tenant scope (central scope included)."""
    state = _scope.get()
    return None if state is None else state.tenant


def in_central_scope() -> bool:
    """Whether the current code runs inside ``central_scope``."""
    state = _scope.get()
    return state is not None and state.tenant is None


SnapshotKeys = bytes | str | Sequence[bytes | str]


def _snapshot_keys(keys: SnapshotKeys | None) -> list[bytes]:
    return [] if keys is None else secret_keys(keys, what="snapshot")


def _snapshot_mac(key: bytes, tenant_id: str) -> str:
    message = f"asgi-tenancy snapshot v{SNAPSHOT_VERSION}:{tenant_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def capture(*, key: bytes | str | None = None) -> dict[str, Any]:
    """A JSON-serialisable snapshot of the current tenant scope, for a background job.

    Only the identifier travels: ``restore`` loads the tenant again, so a job never runs as a
    tenant that was suspended or deleted since. Outside a tenant scope it raises. With ``key``
    the snapshot carries an HMAC-SHA256 of the tenant, so a queue that can be written to cannot
    redirect a job to another tenant: ``restore(..., keys=...)`` checks it.
    """
    tenant_id = current_tenant().id
    snapshot: dict[str, Any] = {"version": SNAPSHOT_VERSION, "tenant_id": tenant_id}
    if key is not None:
        snapshot["mac"] = _snapshot_mac(_snapshot_keys(key)[0], tenant_id)
    return snapshot


def _snapshot_tenant_id(snapshot: object, keys: list[bytes]) -> str:
    fields = {"version", "tenant_id", "mac"} if keys else {"version", "tenant_id"}
    if (
        not isinstance(snapshot, Mapping)
        or snapshot.get("version") != SNAPSHOT_VERSION
        or set(snapshot) != fields
    ):
        if isinstance(snapshot, Mapping) and not keys and "mac" in snapshot:
            raise TenantContextError(
                "a signed snapshot needs its keys to be restored", hint="restore(..., keys=...)"
            )
        raise TenantContextError("not a tenant context snapshot (or not signed)")
    try:
        tenant_id = validate_tenant_id(snapshot["tenant_id"])
    except InvalidTenantIdentifier:
        raise TenantContextError("not a tenant context snapshot") from None
    if keys:
        mac = snapshot["mac"]
        if not isinstance(mac, str) or not any(
            hmac.compare_digest(mac, _snapshot_mac(key, tenant_id)) for key in keys
        ):
            raise TenantContextError("the snapshot's signature does not verify")
    return tenant_id


@asynccontextmanager
async def restore(
    snapshot: Mapping[str, Any], store: TenantStore, *, keys: SnapshotKeys | None = None
) -> AsyncIterator[Tenant]:
    """Re-open the scope a snapshot was captured in, after loading the tenant from ``store``.

    A tenant that no longer exists or is suspended raises ``TenantNotFound``. With ``keys``
    (the current key first, the previous one during a rotation) only a snapshot signed by one
    of them is restored; an unsigned or edited one raises ``TenantContextError``.
    """
    from .store import load_tenant

    tenant = await load_tenant(store, _snapshot_tenant_id(snapshot, _snapshot_keys(keys)))
    async with tenant_scope(tenant):
        yield tenant


def bind_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``fn`` so it runs in the tenant context current now, from any thread.

    For executors and thread pools that do not copy contextvars themselves; each call runs in
    its own copy of the captured context, so concurrent calls never share one.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return captured.copy().run(fn, *args, **kwargs)

    return wrapper
