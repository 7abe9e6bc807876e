"""The SQL guard: run untrusted (user- or model-written) SELECTs inside one tenant.

Needs the ``sqlguard`` extra (``pglast``). Importing ``asgi_tenancy`` never loads this package.
"""

from ..errors import UnsafeQuery
from ._reasons import REASONS
from .guard import GuardedQuery, SqlGuard

__all__ = ["REASONS", "GuardedQuery", "SqlGuard", "UnsafeQuery"]
