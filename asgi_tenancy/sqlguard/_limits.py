"""Cheap bounds checked before the parser ever sees the text.

PostgreSQL's parser (compiled into ``pglast``) recurses on nested expressions; deep enough
input exhausts the C stack and kills the process, which no ``except`` can catch. These scans
are linear, run in C (``str.count``, one regex) and count conservatively: brackets and
operator characters inside literals and comments count too.
"""

from __future__ import annotations

import re

from ..errors import UnsafeQuery
from . import _reasons as r

__all__ = ["OPERATOR_BUDGET", "check_limits", "check_text"]

# Characters that build binary or unary operator chains (``1+1+1...``, ``- - - 1``, ``x::t::t``).
_OPERATOR_CHARS = "+-*/<>=~!@#%^&|:"
OPERATOR_BUDGET = 2_000
_NOT_BRACKET = re.compile(r"[^()\[\]]+")


def check_text(sql: str) -> bytes:
    """The UTF-8 form of ``sql``; ``UnsafeQuery(invalid_text)`` for what no server accepts."""
    if "\x00" in sql:
        raise UnsafeQuery(r.INVALID_TEXT, "the query holds a NUL character")
    try:
        return sql.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeQuery(r.INVALID_TEXT, "the query is not valid Unicode text") from None


def check_limits(sql: str, *, max_length: int, max_depth: int) -> None:
    """Raise ``UnsafeQuery(too_complex)`` when ``sql`` is too long, too nested or too dense."""
    if len(sql) > max_length:
        raise UnsafeQuery(
            r.TOO_COMPLEX,
            f"query is {len(sql)} characters long; the limit is {max_length}",
            hint="split the question into smaller queries",
        )
    if sum(sql.count(c) for c in _OPERATOR_CHARS) > OPERATOR_BUDGET:
        raise UnsafeQuery(
            r.TOO_COMPLEX,
            f"query holds more than {OPERATOR_BUDGET} operator characters",
            hint="simplify the expressions",
        )
    if sql.count("(") + sql.count("[") <= max_depth:
        return
    depth = 0
    for ch in _NOT_BRACKET.sub("", sql):
        depth = depth + 1 if ch in "([" else depth - 1
        if depth > max_depth:
            raise UnsafeQuery(
                r.TOO_COMPLEX,
                f"brackets nest deeper than {max_depth} levels",
                hint="flatten nested subqueries into CTEs",
            )
