"""Cache keys and object-storage prefixes namespaced by the current tenant (standard library only).

Every key is ``namespace SEP tenant SEP part [SEP part...]``. The separator can appear in
neither a tenant id nor a part, so the tenant segment always ends where it seems to: no crafted
part, encoding or path trick can make a key of one tenant read as a key of another, and a prefix
of ``acme`` never matches ``acme-corp``. Parts are a plain ASCII grammar (no ``/``, ``\\``, ``%``,
dot segments, glob characters, whitespace or non-ASCII), so storage that decodes, normalises or
resolves paths sees the same key, and a Redis ``SCAN MATCH`` pattern matches only this tenant.
Upper-case letters of the tenant id are written ``~`` + lower case, so ``Acme`` and ``acme``
stay apart on case-insensitive storage too.
"""

from __future__ import annotations

import re

from .context import current_tenant, in_central_scope
from .errors import IsolationConfigError, TenancyError, TenantContextError
from .tenant import validate_tenant_id

__all__ = ["MAX_KEY_BYTES", "SEPARATORS", "InvalidKeyPart", "KeySpace"]

SEPARATORS = frozenset(":/|")
MAX_KEY_BYTES = 1024  # the smallest common limit: S3, GCS and Azure object names
_PART = re.compile(r"[A-Za-z0-9_@+=,-][A-Za-z0-9._@+=,-]{0,254}\Z")


class InvalidKeyPart(TenancyError):
    """A key part is outside the key grammar (or the key too long): never written, never read."""

    code = "invalid_key_part"
    status_code = 400
    title = "Invalid key part"


def _part(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidKeyPart("a key part must be a string or an integer")
    text = str(value)
    if not _PART.match(text):
        raise InvalidKeyPart(
            "a key part must be 1-255 ASCII letters, digits or '._@+=,-', not starting with '.'",
            hint="hash free text first, e.g. hashlib.sha256(text.encode()).hexdigest()",
        )
    return text


def _tenant_segment(tenant_id: str) -> str:
    # Injective and case-proof: '~' never occurs in an id, and the result has no upper case.
    return "".join(f"~{c.lower()}" if "A" <= c <= "Z" else c for c in tenant_id)


class KeySpace:
    """Keys of one kind (``KeySpace("cache")``, ``KeySpace("uploads", separator="/")``).

    ``key()``, ``prefix()`` and ``pattern()`` read the current tenant and raise
    ``TenantContextError`` outside a tenant scope (the central scope included).
    """

    __slots__ = ("namespace", "separator")

    def __init__(self, namespace: str, *, separator: str = ":") -> None:
        if separator not in SEPARATORS:
            raise IsolationConfigError(
                "a KeySpace separator must be one of ':', '/' or '|'",
                hint="use ':' for cache keys and '/' for object-storage paths",
            )
        try:
            if not isinstance(namespace, str):
                raise InvalidKeyPart()
            self.namespace = _part(namespace)
        except InvalidKeyPart:
            raise IsolationConfigError(
                "a KeySpace namespace must follow the key part grammar", hint="e.g. 'cache'"
            ) from None
        self.separator = separator

    def __repr__(self) -> str:
        return f"KeySpace({self.namespace!r}, separator={self.separator!r})"

    def key(self, *parts: str | int) -> str:
        """The current tenant's key for ``parts``: ``key("user", 42)`` is ``cache:acme:user:42``."""
        if not parts:
            raise InvalidKeyPart("a key needs at least one part")
        return self._join(current_tenant().id, parts, end="")

    def prefix(self, *parts: str | int) -> str:
        """The current tenant's prefix, ending with the separator: ``uploads/acme/invoices/``.

        List object storage with it: ending with the separator, it never matches a sibling
        (``invoices-old``) nor another tenant whose id starts with this one's.
        """
        return self._join(current_tenant().id, parts, end=self.separator)

    def pattern(self, *parts: str | int) -> str:
        """A Redis ``SCAN MATCH`` pattern for every key of the current tenant below ``parts``."""
        return self.prefix(*parts) + "*"

    def central_prefix(self, tenant_id: str, *parts: str | int) -> str:
        """Another tenant's prefix, for central work only (purging a deleted tenant's keys).

        Refused outside ``central_scope``: tenant code never computes another tenant's keys.
        """
        if not in_central_scope():
            raise TenantContextError("central_prefix() runs only inside central_scope")
        return self._join(validate_tenant_id(tenant_id), parts, end=self.separator)

    def _join(self, tenant_id: str, parts: tuple[str | int, ...], *, end: str) -> str:
        pieces = [self.namespace, _tenant_segment(tenant_id), *(_part(p) for p in parts)]
        joined = self.separator.join(pieces) + end
        if len(joined) > MAX_KEY_BYTES:
            raise InvalidKeyPart(f"a key is at most {MAX_KEY_BYTES} bytes")
        return joined
