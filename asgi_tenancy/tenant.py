"""The tenant value and the one rule every tenant identifier must pass."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import InvalidTenantIdentifier

__all__ = ["TENANT_ID_PATTERN", "Tenant", "TenantStatus", "validate_tenant_id"]

# ASCII letters and digits first, then letters, digits, '.', '_' or '-'; 63 characters at most
# (a PostgreSQL identifier or a DNS label fits). ``\Z`` so a trailing newline never passes.
TENANT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


# Identifiers already seen valid (a dict lookup instead of the pattern on every request);
# cleared when full, so it holds at most 10,000 ids of 63 characters at most (about 1 MB).
_VALID: dict[str, None] = {}
_VALID_MAX = 10_000


def validate_tenant_id(value: object) -> str:
    """Return ``value`` if it is a well-formed tenant identifier, else raise.

    Raises ``InvalidTenantIdentifier`` for non-strings, empty or overlong values, whitespace,
    control characters and anything outside ``TENANT_ID_PATTERN``. The message never repeats
    the value: it may come straight from a request.
    """
    if type(value) is str and value in _VALID:
        return value
    if not isinstance(value, str):
        raise InvalidTenantIdentifier("tenant identifier must be a string")
    if not TENANT_ID_PATTERN.match(value):
        raise InvalidTenantIdentifier(
            "tenant identifier must be 1-63 characters: ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if len(_VALID) >= _VALID_MAX:
        _VALID.clear()
    _VALID[value] = None
    return value


class TenantStatus(enum.StrEnum):
    """Whether a tenant may be served: only ``ACTIVE`` is.

    ``SUSPENDED`` is answered as not found; ``MIGRATING`` (its schema is being migrated) with a
    503 and ``Retry-After``.
    """

    ACTIVE = "active"
    SUSPENDED = "suspended"
    MIGRATING = "migrating"


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant: a validated ``id``, a ``status`` and read-only ``attributes``.

    Attributes carry what strategies need (``schema``, ``database_url``, ``role``) and whatever
    the application adds (plan, region). They are copied on construction, so later changes to
    the mapping given never reach the tenant.
    """

    id: str
    status: TenantStatus = TenantStatus.ACTIVE
    attributes: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        validate_tenant_id(self.id)
        try:
            status = TenantStatus(self.status)
        except ValueError:
            raise ValueError("tenant status must be 'active', 'suspended' or 'migrating'") from None
        if not isinstance(self.attributes, Mapping):
            raise TypeError("tenant attributes must be a mapping")
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    @property
    def is_active(self) -> bool:
        return self.status is TenantStatus.ACTIVE

    def __repr__(self) -> str:
        # Attributes may hold DSNs with passwords; a repr lands in logs and tracebacks.
        return f"Tenant(id={self.id!r}, status={self.status.value!r})"
