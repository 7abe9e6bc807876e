"""What the analysis knows: relations and their columns, namespaces, edits; naming rules.

A relation's columns are ``Cols``: the names that are certainly its columns, and whether they
are all of them. Names must never be claimed that PostgreSQL would not find: a name the guard
believes is a column is one the server will not read as a function call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..errors import UnsafeQuery
from . import _reasons as r
from ._allowlist import SQL_VALUE_FUNCTIONS

__all__ = [
    "COLUMN",
    "IDENT_CONT",
    "LEAVES",
    "MAX_RELATIONS",
    "NAME_FOLLOWS",
    "NAME_RISKY",
    "PASSTHROUGH",
    "REFUSED",
    "UNKNOWN",
    "WRITES",
    "Analysis",
    "Cols",
    "Edit",
    "Item",
    "Level",
    "Node",
    "TableRule",
    "alias_of",
    "branch",
    "figure_colname",
    "is_table_form",
    "name_list",
    "only",
    "quote",
    "refuse",
    "unknown_column",
    "wrapper",
]

Node = dict[str, Any]
MAX_RELATIONS = 200  # FROM items, CTE references and subqueries in one query


@dataclass(frozen=True, slots=True)
class TableRule:
    """How one declared table is read: filtered on ``tenant_column``, or as is (``None``)."""

    name: str
    tenant_column: str | None
    shared: bool
    columns: tuple[str, ...] | None = None  # declared columns in order; None: not known


@dataclass(frozen=True, slots=True)
class Cols:
    """A relation's columns: ``names`` are certainly columns; ``complete``: they are all."""

    names: tuple[str, ...]
    complete: bool
    colset: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "colset", frozenset(self.names))

    def renamed(self, aliases: list[str]) -> Cols:
        if not aliases:
            return self
        if not self.complete:
            return Cols(tuple(aliases), False)
        return Cols(tuple(aliases) + self.names[len(aliases) :], True)


UNKNOWN = Cols((), False)


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace bytes ``start:end`` of the statement with ``text``."""

    start: int
    end: int
    text: str


@dataclass(slots=True)
class Analysis:
    edits: list[Edit] = field(default_factory=list)
    tables: set[str] = field(default_factory=set)
    literals: list[tuple[int, str]] = field(default_factory=list)  # (byte offset, value)
    table_forms: list[int] = field(default_factory=list)  # indexes in edits: ``TABLE name``
    placeholders: int = 0
    output: Cols = UNKNOWN


class Item:
    """One namespace entry (PostgreSQL's ParseNamespaceItem)."""

    __slots__ = ("cols", "cols_visible", "colset", "lateral_only", "refname", "rel_visible")

    def __init__(self, refname: str | None, cols: Cols, *, rel_visible: bool = True) -> None:
        self.refname = refname
        self.cols = cols
        self.colset = cols.colset
        self.rel_visible = rel_visible and refname is not None
        self.cols_visible = True
        self.lateral_only = False


class Level:
    """One query level (PostgreSQL's ParseState): its namespace and its CTEs."""

    __slots__ = ("ctes", "items", "lateral_active", "parent")

    def __init__(self, parent: Level | None) -> None:
        self.parent = parent
        self.items: list[Item] = []
        self.ctes: dict[str, Cols] = {}
        self.lateral_active = False


IDENT_CONT = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$") | (
    frozenset(range(0x80, 0x100))
)
# after a plain table name: bytes that end it and start no comment, '.' or inheritance '*'
NAME_FOLLOWS = frozenset(b" ,)\n\t\r;")
NAME_RISKY = frozenset(b"*-/.")
COLUMN = object()  # a bare name that is a column (or may be one)


def refuse(reason: str, message: str, hint: str | None = None) -> UnsafeQuery:
    return UnsafeQuery(reason, message, hint=hint)


def name_list(items: list[Node] | None) -> list[str]:
    out: list[str] = []
    for item in items or ():
        value = item.get("String", {}).get("sval")
        if not isinstance(value, str):
            raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected name in query")
        out.append(value)
    return out


def only(node: object) -> tuple[str, Node]:
    if not isinstance(node, dict) or len(node) != 1:
        raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected query structure")
    ((kind, body),) = node.items()
    if not isinstance(body, dict):
        raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected query structure")
    return kind, body


def branch(node: object) -> Node:
    """A set operation's branch: a SelectStmt body (pglast gives it unwrapped)."""
    if not isinstance(node, dict):
        raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected query structure")
    if len(node) == 1 and "SelectStmt" in node:
        return only(node)[1]
    return node


def alias_of(body: Node) -> tuple[str | None, list[str]]:
    alias = body.get("alias")
    if not alias:
        return None, []
    return alias.get("aliasname"), name_list(alias.get("colnames"))


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def unknown_column(message: str) -> UnsafeQuery:
    return refuse(
        r.UNKNOWN_COLUMN,
        message,
        "reference columns of the tables, CTEs and subqueries in scope (alias.column)",
    )


# Expression nodes whose children are walked with no check of their own.
PASSTHROUGH = frozenset(
    {
        "A_ArrayExpr",
        "BoolExpr",
        "BooleanTest",
        "CaseExpr",
        "CaseWhen",
        "CoalesceExpr",
        "GroupingFunc",
        "GroupingSet",
        "List",
        "MinMaxExpr",
        "NamedArgExpr",
        "NullTest",
        "RowExpr",
    }
)
LEAVES = frozenset({"A_Star", "BitString", "Boolean", "Float", "Integer", "String"})

REFUSED: Mapping[str, tuple[str, str]] = {
    "ParamRef": (r.PARAMETER_NOT_ALLOWED, "query parameters ($1) are not accepted"),
    "LockingClause": (r.LOCKING_CLAUSE, "FOR UPDATE / FOR SHARE is not allowed"),
    "XmlExpr": (r.FORBIDDEN_FUNCTION, "XML functions are not allowed"),
    "XmlSerialize": (r.FORBIDDEN_FUNCTION, "XML functions are not allowed"),
    "RangeTableFunc": (r.FORBIDDEN_FUNCTION, "XMLTABLE is not allowed"),
    "InsertStmt": (r.NOT_A_SELECT, "only SELECT queries are accepted"),
    "UpdateStmt": (r.NOT_A_SELECT, "only SELECT queries are accepted"),
    "DeleteStmt": (r.NOT_A_SELECT, "only SELECT queries are accepted"),
    "MergeStmt": (r.NOT_A_SELECT, "only SELECT queries are accepted"),
}
WRITES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})

SUBLINK_NAMES = {"EXISTS_SUBLINK": "exists", "ARRAY_SUBLINK": "array"}


def figure_colname(node: object) -> tuple[str, int]:
    """The output column name PostgreSQL gives an unaliased expression, and its strength."""
    if not isinstance(node, dict) or len(node) != 1:
        return "?column?", 0
    ((kind, body),) = node.items()
    if kind == "ColumnRef":
        fields = body.get("fields") or []
        last = fields[-1] if fields else None
        if isinstance(last, dict) and "String" in last:
            return str(last["String"]["sval"]), 2
        return "?column?", 0
    if kind == "A_Indirection":
        name = None
        for element in body.get("indirection") or ():
            if isinstance(element, dict) and "String" in element:
                name = element["String"]["sval"]
        if name is not None:
            return str(name), 2
        return figure_colname(body.get("arg"))
    if kind == "FuncCall":
        names = body.get("funcname") or []
        return str(names[-1]["String"]["sval"]), 2
    if kind == "A_Expr":
        if body.get("kind") == "AEXPR_NULLIF":
            return "nullif", 2
        return "?column?", 0
    if kind == "TypeCast":
        name, strength = figure_colname(body.get("arg"))
        if strength <= 1:
            names = (body.get("typeName") or {}).get("names") or []
            if names:
                return str(names[-1]["String"]["sval"]), 1
        return name, strength
    if kind == "CollateClause":
        return figure_colname(body.get("arg"))
    if kind == "GroupingFunc":
        return "grouping", 2
    if kind == "SubLink":
        link = body.get("subLinkType")
        if link in SUBLINK_NAMES:
            return SUBLINK_NAMES[link], 2
        if link == "EXPR_SUBLINK":
            select = (body.get("subselect") or {}).get("SelectStmt") or {}
            targets = select.get("targetList") or []
            if targets:
                target = targets[0].get("ResTarget", {})
                if target.get("name"):
                    return str(target["name"]), 2
                return figure_colname(target.get("val"))
        return "?column?", 0
    if kind == "CaseExpr":
        name, strength = figure_colname(body.get("defresult"))
        if strength <= 1:
            return "case", 1
        return name, strength
    if kind == "A_ArrayExpr":
        return "array", 1
    if kind == "RowExpr":
        return "row", 1
    if kind == "CoalesceExpr":
        return "coalesce", 2
    if kind == "MinMaxExpr":
        return ("greatest" if body.get("op") == "IS_GREATEST" else "least"), 2
    if kind == "SQLValueFunction":
        return SQL_VALUE_FUNCTIONS.get(str(body.get("op")), "?column?"), 2
    return "?column?", 0


@lru_cache(maxsize=1024)
def wrapper(rule: TableRule, schema: str | None, placeholder: str, barrier: bool) -> str | None:
    """The subquery that stands for ``rule``'s table: its columns, its tenant's rows.

    ``barrier``: ``OFFSET 0`` keeps the planner from merging the subquery into the query or
    pushing the query's conditions into it, so no expression of the query is evaluated on
    another tenant's row (an error there, ``1/0`` or a failed cast, would tell about it).
    """
    if schema is None or (rule.tenant_column is None and not rule.shared):
        relation = quote(rule.name)  # resolved by the session's search_path
    else:
        relation = f"{quote(schema)}.{quote(rule.name)}"
    if rule.columns is None:
        if rule.tenant_column is None:
            return None if relation == quote(rule.name) else relation
        select = "*"
    else:
        select = ", ".join(quote(c) for c in rule.columns)
    sql = f"(SELECT {select} FROM {relation}"
    if rule.tenant_column is not None:
        sql += f" WHERE {quote(rule.tenant_column)} = {placeholder}"
        if barrier:
            sql += " OFFSET 0"
    return sql + ")"


def is_table_form(body: Node) -> bool:
    # ``TABLE name`` parses as SELECT * FROM name with no source location for the star
    targets = body.get("targetList")
    if not targets or len(targets) != 1 or len(body.get("fromClause", ())) != 1:
        return False
    target = targets[0].get("ResTarget", {})
    return target.get("location") == -1 and "RangeVar" in body["fromClause"][0]
