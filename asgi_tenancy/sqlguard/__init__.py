"""The SQL guard: run untrusted (user- or model-written) SELECTs inside one tenant.

Needs the ``sqlguard`` extra (``pglast``, ``orjson``). Importing ``asgi_tenancy`` never loads
this package.
"""

from ..errors import GuardedQueryFailed, GuardedQueryTimeout, GuardedResultTooLarge, UnsafeQuery
from ._reasons import REASONS
from .guard import GuardedQuery, SqlGuard
from .reader import check_reader_role, reader_role_ddl

__all__ = [
    "REASONS",
    "GuardedQuery",
    "GuardedQueryFailed",
    "GuardedQueryTimeout",
    "GuardedResultTooLarge",
    "SqlGuard",
    "UnsafeQuery",
    "check_reader_role",
    "reader_role_ddl",
]
