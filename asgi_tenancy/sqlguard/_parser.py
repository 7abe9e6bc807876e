"""The one place that calls pglast (untyped): PostgreSQL's raw parse tree as JSON values."""

from __future__ import annotations

import json
from typing import Any

from pglast import parser as _pg

from ..errors import UnsafeQuery
from . import _reasons as r

__all__ = ["parse", "tokens_before"]


def parse(sql: str) -> dict[str, Any]:
    """The raw parse tree of ``sql``; parser errors become ``UnsafeQuery``."""
    try:
        text = _pg.parse_sql_json(sql)
    except _pg.ParseError as exc:
        message = str(exc)
        if "stack depth" in message:
            raise UnsafeQuery(r.TOO_COMPLEX, "query nests too deeply") from None
        raise UnsafeQuery(r.PARSE_ERROR, f"syntax error: {message}") from None
    except (ValueError, TypeError, UnicodeError):
        # e.g. NUL characters, lone surrogates: nothing PostgreSQL would accept either
        raise UnsafeQuery(r.PARSE_ERROR, "query text cannot be parsed") from None
    try:
        tree = json.loads(text)
    except RecursionError:
        raise UnsafeQuery(r.TOO_COMPLEX, "query nests too deeply") from None
    if not isinstance(tree, dict):  # pragma: no cover - pglast always answers an object
        raise UnsafeQuery(r.PARSE_ERROR, "query text cannot be parsed")
    return tree


def tokens_before(sql: str, char_offset: int) -> tuple[str | None, int]:
    """Name and character offset of the last non-comment token starting before ``char_offset``."""
    previous: tuple[str | None, int] = (None, -1)
    for token in _pg.scan(sql):
        if token.start >= char_offset:
            break
        if token.name not in ("C_COMMENT", "SQL_COMMENT"):
            previous = (str(token.name), int(token.start))
    return previous
