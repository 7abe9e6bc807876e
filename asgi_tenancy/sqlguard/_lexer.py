"""Find where a table name ends in the query's bytes, starting from the parser's location.

The raw parse tree gives where a relation name starts, not where it ends. The name is one to
three identifiers joined by dots, with whitespace and comments allowed between them, and an
optional ``*`` after it. Every identifier read here is checked against the name the parser
produced, so a disagreement refuses the query instead of splicing at a wrong offset.
"""

from __future__ import annotations

from ..errors import UnsafeQuery
from . import _reasons as r

__all__ = ["identifier", "name_span", "skip_space"]

_SPACE = b" \t\n\r\f\v"
_IDENT_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_") | frozenset(
    range(0x80, 0x100)
)
_IDENT_CONT = _IDENT_START | frozenset(b"0123456789$")


def _mismatch() -> UnsafeQuery:
    return UnsafeQuery(
        r.UNSUPPORTED_SYNTAX,
        "a table name could not be located in the query text",
        hint="write table names plainly, without comments inside them",
    )


def skip_space(b: bytes, i: int) -> int:
    """Offset of the first byte at or after ``i`` that is not whitespace or a comment."""
    n = len(b)
    while i < n:
        c = b[i]
        if c in _SPACE:
            i += 1
        elif b.startswith(b"--", i):
            while i < n and b[i] not in b"\n\r":
                i += 1
        elif b.startswith(b"/*", i):
            depth, i = 1, i + 2
            while depth and i < n:
                if b.startswith(b"/*", i):
                    depth, i = depth + 1, i + 2
                elif b.startswith(b"*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                raise _mismatch()
        else:
            break
    return i


def _quoted(b: bytes, i: int) -> tuple[int, bytes]:
    # b[i] is the opening quote; "" inside stands for one quote
    j, out = i + 1, bytearray()
    while True:
        k = b.find(b'"', j)
        if k < 0:
            raise _mismatch()
        out += b[j:k]
        if b.startswith(b'""', k):
            out += b'"'
            j = k + 2
        else:
            return k + 1, bytes(out)


def identifier(b: bytes, i: int) -> tuple[int, bytes | None]:
    """End of the identifier at ``i`` and its normalised name (``None``: Unicode escapes)."""
    if i >= len(b):
        raise _mismatch()
    if b[i : i + 3].lower() == b'u&"':
        end, _ = _quoted(b, i + 2)
        j = skip_space(b, end)
        if b[j : j + 7].lower() == b"uescape" and (j + 7 >= len(b) or b[j + 7] not in _IDENT_CONT):
            k = skip_space(b, j + 7)
            if not b.startswith(b"'", k):
                raise _mismatch()
            close = b.find(b"'", k + 1)
            if close < 0:
                raise _mismatch()
            if b.startswith(b"''", k + 1):  # UESCAPE '''': the quote itself
                close = k + 3
            end = close + 1
        return end, None
    if b[i] == 0x22:
        return _quoted(b, i)
    if b[i] not in _IDENT_START:
        raise _mismatch()
    j = i + 1
    while j < len(b) and b[j] in _IDENT_CONT:
        j += 1
    return j, b[i:j].lower()


def name_span(b: bytes, start: int, parts: list[str]) -> int:
    """End offset of the dotted name at ``start`` whose parts the parser read as ``parts``."""
    i = start
    for index, part in enumerate(parts):
        if index:
            i = skip_space(b, i)
            if not b.startswith(b".", i):
                raise _mismatch()
            i = skip_space(b, i + 1)
        i, name = identifier(b, i)
        if name is not None and name[:63] != part.encode()[:63]:
            raise _mismatch()
    j = skip_space(b, i)
    if b.startswith(b"*", j):
        return j + 1
    return i
