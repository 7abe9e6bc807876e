"""Build the rewritten text from the original bytes and the analysis' edits.

No deparse: the text between edits is the caller's, byte for byte, so what PostgreSQL runs is
what the guard read. The result is then made safe for SQLAlchemy's ``text()``, which reads
``:name`` as a bind parameter anywhere, string literals included.
"""

from __future__ import annotations

import re

from ..errors import UnsafeQuery
from . import _reasons as r
from ._analyze import Edit

__all__ = ["TENANT_PARAM", "splice"]

TENANT_PARAM = "tenant_id"
_PLACEHOLDER = f":{TENANT_PARAM}"
# The two patterns SQLAlchemy applies to text() (sqlalchemy.sql.compiler BIND_PARAMS and
# BIND_PARAMS_ESC); the result is checked against them, so a drift refuses instead of leaking.
_BIND = re.compile(r"(?<![:\w\x5c]):(\w+)(?![:\w])", re.UNICODE)
_ESCAPED = re.compile(r"\x5c(:\w*)(?![:\w])", re.UNICODE)
_MARK = "\x00tenant\x00"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _relation(edit: Edit, schema: str | None) -> str:
    name = quote_ident(edit.rule.name)
    return name if schema is None else f"{quote_ident(schema)}.{name}"


def _replacement(edit: Edit, schema: str | None, param: str) -> str:
    relation = _relation(edit, schema)
    if edit.rule.tenant_column is None:
        return relation
    sub = f"(SELECT * FROM {relation} WHERE {quote_ident(edit.rule.tenant_column)} = {param})"
    if edit.table_form:
        return f" SELECT * FROM {sub} AS {quote_ident(edit.rule.name)} "
    if edit.alias is not None:
        return f" {sub} AS {quote_ident(edit.alias)} "
    return f" {sub} "


def _escape(segment: str) -> str:
    if ":" not in segment:
        return segment
    if "\\:" in segment and _ESCAPED.search(segment):
        raise UnsafeQuery(
            r.UNSUPPORTED_SYNTAX,
            "a backslash before a colon cannot be passed through safely",
            hint="write the literal without '\\:'",
        )
    return _BIND.sub(lambda m: "\\" + m.group(0), segment)


def splice(b: bytes, start: int, end: int, edits: list[Edit], schema: str | None) -> str:
    """The statement ``b[start:end]`` with ``edits`` applied, ready for ``text()``."""
    final: list[str] = []
    expected: list[str] = []
    pos = start
    for edit in sorted(edits, key=lambda e: e.start):
        if edit.start < pos or edit.end > end:
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "overlapping table references")
        segment = b[pos : edit.start].decode()
        final += (_escape(segment), _replacement(edit, schema, _PLACEHOLDER))
        expected += (segment, _replacement(edit, schema, _MARK))
        pos = edit.end
    tail = b[pos:end].decode()
    final.append(_escape(tail))
    expected.append(tail)
    text = "".join(final)
    if ":" not in b[start:end].decode():
        return text  # only the placeholders can be read as parameters

    def bind(m: re.Match[str]) -> str:
        return _MARK if m.group(1) == TENANT_PARAM else "\x00unexpected\x00"

    if _ESCAPED.sub(lambda m: m.group(1), _BIND.sub(bind, text)) != "".join(expected):
        raise UnsafeQuery(
            r.UNSUPPORTED_SYNTAX,
            "the query holds ':name' sequences that cannot be passed through safely",
        )
    return text
