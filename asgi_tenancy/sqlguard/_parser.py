"""The one place that calls pglast (untyped): PostgreSQL's raw parse tree and its tokens."""

from __future__ import annotations

import gc
from typing import Any

from pglast import parser as _pg

from ..errors import UnsafeQuery
from . import _reasons as r

try:  # orjson decodes pglast's JSON about twice as fast; the standard library does too
    from orjson import JSONDecodeError as _DecodeError
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson ships with the sqlguard extra
    from json import JSONDecodeError as _DecodeError  # type: ignore[assignment]
    from json import loads as _loads  # type: ignore[assignment]

__all__ = ["Token", "parse", "scan"]

Token = tuple[int, int, str]
_NO_GC_ABOVE = 65_536  # bytes of JSON  # (byte start, byte end exclusive, token name)


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
        raise UnsafeQuery(r.INVALID_TEXT, "query text cannot be parsed") from None
    # Decoding a big tree allocates one object per node; the cyclic collector, run again and
    # again over the growing tree, would make the decode super-linear. The tree has no cycles.
    collecting = len(text) > _NO_GC_ABOVE and gc.isenabled()
    if collecting:
        gc.disable()
    try:
        tree = _loads(text)
    except (RecursionError, _DecodeError):
        raise UnsafeQuery(r.TOO_COMPLEX, "query nests too deeply") from None
    finally:
        if collecting:
            gc.enable()
    if not isinstance(tree, dict):  # pragma: no cover - pglast always answers an object
        raise UnsafeQuery(r.PARSE_ERROR, "query text cannot be parsed")
    return tree


def scan(sql: str, b: bytes) -> list[Token]:
    """PostgreSQL's own tokens of ``sql``, with byte offsets into ``b`` (its UTF-8 form)."""
    collecting = len(sql) > _NO_GC_ABOVE // 8 and gc.isenabled()
    if collecting:  # one object per token, no cycles: as for the tree above
        gc.disable()
    try:
        tokens = _pg.scan(sql)
    finally:
        if collecting:
            gc.enable()
    if sql.isascii():
        return [(int(t.start), int(t.end) + 1, str(t.name)) for t in tokens]
    # pglast counts characters; the parse tree counts bytes: map once, linearly
    offsets = [0] * (len(sql) + 1)
    position = 0
    for index, char in enumerate(sql):
        offsets[index] = position
        position += len(char.encode("utf-8", "surrogatepass"))
    offsets[len(sql)] = position
    return [(offsets[t.start], offsets[t.end + 1], str(t.name)) for t in tokens]
