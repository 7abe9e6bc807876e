"""Build the rewritten text from the original bytes and the analysis' edits.

No deparse: outside the edits the text is the caller's, so what PostgreSQL runs is what the
guard read. The result is made immune to parameter styles: every string literal or quoted
identifier holding ``%``, ``:``, ``$``, ``?`` or ``\\`` is re-written from the value the parser
read (``E'...\\x25...'``, ``U&"...\\0025..."``), comments go, and what is left of ``:name`` in
code is escaped for SQLAlchemy's ``text()``. The only placeholders in the result are the
guard's own, which is checked against SQLAlchemy's own bind patterns before returning.
"""

from __future__ import annotations

import re
from bisect import bisect_left

from ..errors import UnsafeQuery
from . import _reasons as r
from ._analyze import Analysis, Edit
from ._parser import Token, scan

__all__ = ["TENANT_PARAM", "splice"]

TENANT_PARAM = "tenant_id"
PLACEHOLDER = f":{TENANT_PARAM}"

# SQLAlchemy's text() bind pattern (sqlalchemy.sql.compiler BIND_PARAMS) and the pyformat
# pattern its positional dialects rewrite (``%(name)s`` -> ``$1``).
_BIND = re.compile(r"(?<![:\w\x5c]):(\w+)(?![:\w])", re.UNICODE)
_COLON_NAME = re.compile(r":(\w+)(?![:\w])", re.UNICODE)
_WORD = re.compile(r"\w", re.UNICODE)
_PYFORMAT = re.compile(r"%\([^)]+?\)s")
# Bytes that a parameter style may read: outside literals, identifiers and comments a plain
# ``:name`` is the only one that can occur in valid SQL the guard accepts.
_RISKY_BYTE = re.compile(rb"[%$?\\]")
_COLON_WORD = re.compile(rb":[\w\x80-\xff]")
_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:") | (
    frozenset(range(0x80, 0x100))
)
_IDENT_BYTE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$") | (
    frozenset(range(0x80, 0x100))
)
_LITERAL_ESCAPES = str.maketrans(
    {"'": "''", "\\": "\\\\", "%": "\\x25", ":": "\\x3a", "$": "\\x24", "?": "\\x3f"}
)
_IDENT_ESCAPES = str.maketrans(
    {'"': '""', "\\": "\\005c", "%": "\\0025", ":": "\\003a", "$": "\\0024", "?": "\\003f"}
)
_RISKY_CHARS = frozenset("%:$?\\")
_STYLE_CHARS = re.compile(rb"[%:$?]")


def _risky(b: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether ``b[start:end]`` holds a byte a parameter style may read (two cheap scans)."""
    end = len(b) if end is None else end
    if _RISKY_BYTE.search(b, start, end):
        return True
    match = _COLON_WORD.search(b, start, end)
    while match is not None:
        at = match.start()
        if at == 0 or b[at - 1] not in _WORD_BYTES:
            return True
        match = _COLON_WORD.search(b, at + 1, end)
    return False


def _binds(text: str) -> list[str]:
    """The names SQLAlchemy's ``text()`` reads as bind parameters in ``text``: its pattern,
    with the look-behind checked by hand (the regex alone tries it at every position)."""
    found: list[str] = []
    for match in _COLON_NAME.finditer(text):
        at = match.start()
        if at and (text[at - 1] in ":\\" or _WORD.match(text, at - 1)):
            continue
        found.append(match.group(1))
    return found


def _unsupported(message: str) -> UnsafeQuery:
    return UnsafeQuery(r.UNSUPPORTED_SYNTAX, message)


def _literal(value: str, b: bytes, start: int) -> str:
    text = "E'" + value.translate(_LITERAL_ESCAPES) + "'"
    return " " + text if start and b[start - 1] in _IDENT_BYTE else text


def _standard_literal(b: bytes, location: int, value: str) -> int | None:
    """End of the plain ``'...'`` literal at ``location`` whose value is ``value``, or None."""
    if b[location : location + 1] != b"'" or (location and b[location - 1] in _IDENT_BYTE):
        return None
    i = location + 1
    while True:
        j = b.find(b"'", i)
        if j < 0:
            return None
        if b[j + 1 : j + 2] == b"'":
            i = j + 2
            continue
        end = j + 1
        break
    k = end
    while k < len(b) and b[k] in b" \t\f\v":
        k += 1
    if k < len(b) and b[k] in b"\r\n":
        return None  # a newline may continue the literal ('a'\n'b'): leave it to the scanner
    if b[location + 1 : end - 1].replace(b"''", b"'") != value.encode("utf-8", "surrogatepass"):
        return None
    return end


def _fast_literals(b: bytes, start: int, end: int, analysis: Analysis) -> list[Edit] | None:
    """Literal edits when only plain literals hold risky bytes; None: the scanner must decide."""
    edits: list[Edit] = []
    pos = start
    for location, value in sorted(analysis.literals):
        if location < pos:
            return None
        close = _standard_literal(b, location, value)
        if close is None:
            continue
        if _risky(b, pos, location):
            return None
        if not _RISKY_CHARS.isdisjoint(value):
            edits.append(Edit(location, close, _literal(value, b, location)))
        pos = close
    if _risky(b, pos, end):
        return None
    return edits


def _scanned(sql: str, b: bytes, start: int, end: int, analysis: Analysis) -> list[Edit]:
    """Literal, identifier and comment edits from PostgreSQL's own tokens."""
    values = dict(analysis.literals)
    edits: list[Edit] = []
    previous: Token | None = None
    for token in scan(sql, b):
        t_start, t_end, name = token
        if t_end <= start or t_start >= end:
            continue
        raw = b[t_start:t_end]
        if name in ("C_COMMENT", "SQL_COMMENT"):
            edits.append(Edit(t_start, t_end, " "))
            continue
        risky = _risky(raw)
        if name == "SCONST" and risky and (t_start in values or _STYLE_CHARS.search(raw)):
            value = values.get(t_start)
            adjacent = previous is not None and previous[1] == t_start
            if value is None or (adjacent and previous is not None and previous[2] == "NCHAR"):
                raise _unsupported("a string literal could not be passed through safely")
            edits.append(Edit(t_start, t_end, _literal(value, b, t_start)))
        elif name == "IDENT" and risky and raw.startswith(b'"'):
            value = raw[1:-1].replace(b'""', b'"').decode("utf-8", "surrogatepass")
            edits.append(Edit(t_start, t_end, 'U&"' + value.translate(_IDENT_ESCAPES) + '"'))
        elif name in ("USCONST", "UIDENT"):
            if _STYLE_CHARS.search(raw):
                raise _unsupported("a U& name or literal holds '%', ':', '$' or '?'")
        elif name not in ("SCONST", "IDENT") and b"\\" in raw:
            raise _unsupported("a backslash outside a string literal is not accepted")
        previous = token
    return edits


def _table_forms(sql: str, b: bytes, analysis: Analysis, tokens: list[Token]) -> None:
    # ``TABLE orders`` is replaced from the keyword on: ``SELECT * FROM (...) AS orders``
    code = [t for t in tokens if t[2] not in ("C_COMMENT", "SQL_COMMENT")]
    starts = [t[0] for t in code]
    for index in analysis.table_forms:
        edit = analysis.edits[index]
        before = bisect_left(starts, edit.start) - 1
        if before < 0 or code[before][2] != "TABLE":
            raise _unsupported("unexpected TABLE statement")
        analysis.edits[index] = Edit(code[before][0], edit.end, edit.text)


def _escape_code(segment: str) -> str:
    if ":" not in segment:
        return segment
    return _BIND.sub(lambda m: "\\" + m.group(0), segment)


def splice(sql: str, b: bytes, start: int, end: int, analysis: Analysis) -> str:
    """The statement ``b[start:end]`` with the analysis' edits applied, ready for ``text()``."""
    if analysis.table_forms:
        _table_forms(sql, b, analysis, scan(sql, b))
    literals = _fast_literals(b, start, end, analysis)
    if literals is None:
        literals = _scanned(sql, b, start, end, analysis)
    structural = sorted(analysis.edits, key=lambda e: (e.start, e.end))
    lexical = {id(e) for e in literals}
    edits: list[Edit] = []
    for edit in sorted([*structural, *literals], key=lambda e: (e.start, e.end)):
        if edits and edit.start < edits[-1].end:
            if id(edit) in lexical and edit.end <= edits[-1].end:
                continue  # a comment inside a table name the structural edit replaces
            raise _unsupported("overlapping edits")
        edits.append(edit)
    pieces: list[str] = []
    pos = start
    for edit in edits:
        if edit.start < pos or edit.end > end:
            raise _unsupported("overlapping edits")
        pieces += (_escape_code(b[pos : edit.start].decode()), edit.text)
        pos = edit.end
    pieces.append(_escape_code(b[pos:end].decode()))
    text = "".join(pieces)
    binds = _binds(text)
    if len(binds) != analysis.placeholders or any(name != TENANT_PARAM for name in binds):
        raise _unsupported("the query holds ':name' sequences that cannot be passed through")
    if "%(" in text and _PYFORMAT.search(text):
        raise _unsupported("the query holds '%(name)s' sequences that cannot be passed through")
    return text
