"""Walk PostgreSQL's raw parse tree: refuse what is not allowed, collect where to splice.

Fail-closed by construction: a node type that is not listed here refuses the query. The walk
keeps SQL's CTE scoping (a WITH list is visible to the statement it belongs to and its nested
queries; without RECURSIVE, a CTE sees only the CTEs listed before it), so a CTE named like a
tenant table shadows the table exactly where PostgreSQL would resolve the name to the CTE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsafeQuery
from . import _reasons as r
from ._allowlist import SET_RETURNING_FUNCTIONS, SQL_VALUE_FUNCTIONS
from ._lexer import name_span

__all__ = ["Analysis", "Edit", "TableRule", "analyze"]

Node = dict[str, Any]
Scope = frozenset[str]


@dataclass(frozen=True, slots=True)
class TableRule:
    """How one declared table is read: filtered on ``tenant_column``, or as is (``None``)."""

    name: str
    tenant_column: str | None
    shared: bool


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace bytes ``start:end`` of the statement with a reference to ``rule``'s table."""

    start: int
    end: int
    rule: TableRule
    alias: str | None  # the implicit alias to add (no alias written), else None
    table_form: bool  # ``TABLE name``: the whole simple SELECT is replaced


@dataclass(slots=True)
class Analysis:
    edits: list[Edit] = field(default_factory=list)
    tables: set[str] = field(default_factory=set)


# Constants: nothing below them but values.
_LEAVES = frozenset({"A_Const", "A_Star", "BitString", "Boolean", "Float", "Integer", "String"})

# Node types whose every child is walked with no check of their own.
_PASSTHROUGH = frozenset(
    {
        "A_ArrayExpr",
        "A_Const",
        "A_Indices",
        "A_Indirection",
        "A_Star",
        "Alias",
        "BitString",
        "BoolExpr",
        "Boolean",
        "BooleanTest",
        "CTECycleClause",
        "CTESearchClause",
        "CaseExpr",
        "CaseWhen",
        "CoalesceExpr",
        "ColumnDef",
        "Float",
        "GroupingFunc",
        "GroupingSet",
        "Integer",
        "JoinExpr",
        "List",
        "MinMaxExpr",
        "NamedArgExpr",
        "NullTest",
        "RangeSubselect",
        "ResTarget",
        "RowExpr",
        "String",
        "WindowDef",
    }
)

_REFUSED: Mapping[str, tuple[str, str]] = {
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

_WRITES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


def _names(items: list[Node] | None) -> list[str]:
    out: list[str] = []
    for item in items or ():
        value = item.get("String", {}).get("sval")
        if not isinstance(value, str):
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected name in query")
        out.append(value)
    return out


def _only(node: object) -> tuple[str, Node]:
    if not isinstance(node, dict) or len(node) != 1:
        raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected query structure")
    ((kind, body),) = node.items()
    if not isinstance(body, dict):
        raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected query structure")
    return kind, body


class _Walker:
    def __init__(
        self,
        b: bytes,
        rules: Mapping[str, TableRule],
        schema: str | None,
        functions: frozenset[str],
        max_depth: int,
        allow_recursive: bool,
    ) -> None:
        self.allow_recursive = allow_recursive
        self.b = b
        self.rules = rules
        self.schema = schema
        self.functions = functions
        self.max_depth = max_depth
        self.result = Analysis()

    # -- generic walk -------------------------------------------------------------------------

    def walk(self, value: object, scope: Scope, depth: int) -> None:
        if type(value) is list:
            for item in value:
                self.walk(item, scope, depth)
        elif type(value) is dict:
            self._dict(value, scope, depth)

    def _dict(self, value: Node, scope: Scope, depth: int) -> None:
        if len(value) == 1:
            key = next(iter(value))
            if key[0].isupper():  # a node: {"NodeType": {fields}}
                if key not in _LEAVES:
                    self.node(key, value[key], scope, depth + 1)
                return
        self.fields(value, scope, depth)

    def fields(self, body: Node, scope: Scope, depth: int) -> None:
        for key, child in body.items():
            kind = type(child)
            if kind is list:
                for item in child:
                    if type(item) is dict:
                        self._dict(item, scope, depth)
                    elif type(item) is list:
                        self.walk(item, scope, depth)
            elif kind is dict:
                if key == "typeName":
                    self._type_name(child)
                else:
                    self._dict(child, scope, depth)

    def node(self, kind: str, body: Any, scope: Scope, depth: int) -> None:
        if depth > self.max_depth:
            raise UnsafeQuery(
                r.TOO_COMPLEX,
                f"query nests deeper than {self.max_depth} levels",
                hint="flatten nested subqueries into CTEs",
            )
        if not isinstance(body, dict):
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected query structure")
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, body, scope, depth)
        elif kind in _PASSTHROUGH:
            self.fields(body, scope, depth)
        elif kind in _REFUSED:
            reason, message = _REFUSED[kind]
            raise UnsafeQuery(reason, message)
        else:
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, f"{kind} is not supported in a guarded query")

    # -- statements and scopes -----------------------------------------------------------------

    def _select(self, body: Node, scope: Scope, depth: int) -> None:
        if body.get("intoClause"):
            raise UnsafeQuery(r.NOT_A_SELECT, "SELECT INTO creates a table; it is not allowed")
        if body.get("lockingClause"):
            raise UnsafeQuery(r.LOCKING_CLAUSE, "FOR UPDATE / FOR SHARE is not allowed")
        with_clause = body.get("withClause")
        if with_clause:
            scope = self._with(with_clause, scope, depth)
        table_form = _is_table_form(body)
        for key, child in body.items():
            if key == "withClause":
                continue
            if key in ("larg", "rarg"):
                self.node("SelectStmt", child, scope, depth + 1)
            elif table_form and key == "fromClause":
                _, rv = _only(child[0])
                self._range_var(rv, scope, depth + 1, table_form=True)
            elif isinstance(child, (dict, list)):
                self.walk(child, scope, depth)

    def _with(self, clause: Node, scope: Scope, depth: int) -> Scope:
        ctes: list[tuple[str, Node]] = []
        for item in clause.get("ctes", ()):
            kind, cte = _only(item)
            if kind != "CommonTableExpr":
                raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected WITH item")
            name = cte.get("ctename")
            if not isinstance(name, str):
                raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected WITH item")
            ctes.append((name, cte))
        recursive = bool(clause.get("recursive"))
        if recursive and not self.allow_recursive:
            raise UnsafeQuery(
                r.TOO_COMPLEX,
                "WITH RECURSIVE is not allowed here",
                hint="compute the levels with joins or generate_series",
            )
        if recursive:
            scope = scope | {name for name, _ in ctes}
        for name, cte in ctes:
            query_kind, _ = _only(cte.get("ctequery"))
            if query_kind in _WRITES:
                raise UnsafeQuery(
                    r.DATA_MODIFYING_CTE, f"WITH {name} writes data; only SELECT is allowed"
                )
            if query_kind != "SelectStmt":
                raise UnsafeQuery(r.NOT_A_SELECT, f"WITH {name} must be a SELECT")
            self.fields(cte, scope, depth + 1)
            if not recursive:
                scope = scope | {name}
        return scope

    def _range_var(self, body: Node, scope: Scope, depth: int, *, table_form: bool = False) -> None:
        relname = body.get("relname")
        schema = body.get("schemaname")
        if not isinstance(relname, str):
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected table reference")
        if body.get("catalogname") is not None:
            raise UnsafeQuery(r.SCHEMA_NOT_ALLOWED, "database-qualified names are not allowed")
        if schema is None and relname in scope:
            return  # a CTE in scope
        if schema is not None and schema != self.schema:
            raise UnsafeQuery(
                r.SCHEMA_NOT_ALLOWED,
                f"schema {schema!r} is not allowed"
                + (f"; use {self.schema!r} or no schema" if self.schema else "; use no schema"),
            )
        rule = self.rules.get(relname)
        if rule is None:
            raise UnsafeQuery(
                r.UNKNOWN_TABLE,
                f"table {relname!r} is not available",
                hint="available tables: " + ", ".join(sorted(self.rules)),
            )
        self.result.tables.add(relname)
        if rule.tenant_column is None and not rule.shared:
            if schema is not None:
                # schema-per-tenant: only the session's search_path may resolve the name
                raise UnsafeQuery(r.SCHEMA_NOT_ALLOWED, f"write {relname!r} without a schema")
            return
        if rule.tenant_column is None and self.schema is None:
            return
        if rule.tenant_column is not None and body.get("inh") is not True:
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "ONLY is not supported on tenant tables")
        if table_form and rule.tenant_column is None:
            table_form = False  # qualifying the name keeps ``TABLE name`` valid
        location = body.get("location")
        if not isinstance(location, int) or location < 0:
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected table reference")
        parts = [relname] if schema is None else [schema, relname]
        end = name_span(self.b, location, parts)
        alias = None if body.get("alias") else relname
        self.result.edits.append(Edit(location, end, rule, alias, table_form))

    def _range_function(self, body: Node, scope: Scope, depth: int) -> None:
        for group in body.get("functions", ()):
            _, items = _only(group)
            call = (items.get("items") or [None])[0]
            call_kind, call_body = _only(call)
            if call_kind != "FuncCall":
                raise UnsafeQuery(r.FORBIDDEN_FUNCTION, "only functions may appear in FROM")
            name = self._function_name(call_body)
            if name not in SET_RETURNING_FUNCTIONS or name not in self.functions:
                raise UnsafeQuery(r.FORBIDDEN_FUNCTION, f"function {name!r} is not allowed in FROM")
        self.fields(body, scope, depth)

    # -- expressions ---------------------------------------------------------------------------

    def _function_name(self, body: Node) -> str:
        names = _names(body.get("funcname"))
        if not names:
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected function call")
        if len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            raise UnsafeQuery(
                r.SCHEMA_NOT_ALLOWED, f"function {'.'.join(names)!r}: schema not allowed"
            )
        return names[-1]

    def _func_call(self, body: Node, scope: Scope, depth: int) -> None:
        name = self._function_name(body)
        if name not in self.functions:
            raise UnsafeQuery(
                r.FORBIDDEN_FUNCTION,
                f"function {name!r} is not allowed",
                hint="use aggregates, arithmetic, string, date/time and conditional functions",
            )
        self.fields(body, scope, depth)

    def _operator(self, names: list[str]) -> None:
        if len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            raise UnsafeQuery(
                r.SCHEMA_NOT_ALLOWED, f"operator {'.'.join(names)!r}: schema not allowed"
            )

    def _a_expr(self, body: Node, scope: Scope, depth: int) -> None:
        self._operator(_names(body.get("name")))
        self.fields(body, scope, depth)

    def _sublink(self, body: Node, scope: Scope, depth: int) -> None:
        self._operator(_names(body.get("operName")))
        self.fields(body, scope, depth)

    def _sort_by(self, body: Node, scope: Scope, depth: int) -> None:
        self._operator(_names(body.get("useOp")))
        self.fields(body, scope, depth)

    def _collate(self, body: Node, scope: Scope, depth: int) -> None:
        names = _names(body.get("collname"))
        if len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            raise UnsafeQuery(r.SCHEMA_NOT_ALLOWED, "collation: schema not allowed")
        self.fields(body, scope, depth)

    def _column_ref(self, body: Node, scope: Scope, depth: int) -> None:
        if len(body.get("fields", ())) > 2:
            raise UnsafeQuery(
                r.UNSUPPORTED_SYNTAX,
                "qualify columns with a table name or alias only (alias.column)",
            )

    def _sql_value_function(self, body: Node, scope: Scope, depth: int) -> None:
        op = body.get("op")
        if op not in SQL_VALUE_FUNCTIONS:
            name = str(op).removeprefix("SVFOP_").lower()
            raise UnsafeQuery(r.FORBIDDEN_FUNCTION, f"{name} is not allowed")

    def _type_cast(self, body: Node, scope: Scope, depth: int) -> None:
        self.fields(body, scope, depth)

    def _type_name_node(self, body: Node, scope: Scope, depth: int) -> None:
        self._type_name(body)

    def _type_name(self, body: object) -> None:
        if not isinstance(body, dict):
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "unexpected type name")
        names = _names(body.get("names"))
        if not names or len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            raise UnsafeQuery(r.SCHEMA_NOT_ALLOWED, "type: schema not allowed")
        if names[-1].lower().startswith("reg"):
            raise UnsafeQuery(
                r.FORBIDDEN_TYPE, f"type {names[-1]!r} reads the catalog; it is not allowed"
            )
        if body.get("pct_type"):
            raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "%TYPE is not supported")
        for mod in body.get("typmods", ()):
            kind, _ = _only(mod)
            if kind != "A_Const":
                raise UnsafeQuery(r.UNSUPPORTED_SYNTAX, "type modifiers must be constants")


_HANDLERS: dict[str, Callable[[_Walker, Node, Scope, int], None]] = {
    "SelectStmt": _Walker._select,
    "RangeVar": _Walker._range_var,
    "RangeFunction": _Walker._range_function,
    "FuncCall": _Walker._func_call,
    "TypeCast": _Walker._type_cast,
    "A_Expr": _Walker._a_expr,
    "SubLink": _Walker._sublink,
    "SortBy": _Walker._sort_by,
    "CollateClause": _Walker._collate,
    "ColumnRef": _Walker._column_ref,
    "SQLValueFunction": _Walker._sql_value_function,
    "TypeName": _Walker._type_name_node,
}


def _is_table_form(body: Node) -> bool:
    # ``TABLE name`` parses as SELECT * FROM name with no source location for the star
    targets = body.get("targetList")
    if not targets or len(targets) != 1 or len(body.get("fromClause", ())) != 1:
        return False
    target = targets[0].get("ResTarget", {})
    return target.get("location") == -1 and "RangeVar" in body["fromClause"][0]


def analyze(
    tree: Node,
    b: bytes,
    *,
    rules: Mapping[str, TableRule],
    schema: str | None,
    functions: frozenset[str],
    max_depth: int,
    allow_recursive: bool = True,
) -> tuple[Analysis, int, int]:
    """Check the single statement of ``tree``; its analysis and its byte span in ``b``."""
    stmts = tree.get("stmts") or []
    if not stmts:
        raise UnsafeQuery(r.EMPTY_QUERY, "the query is empty")
    if len(stmts) > 1:
        raise UnsafeQuery(
            r.MULTIPLE_STATEMENTS, "send exactly one statement", hint="remove the semicolons"
        )
    raw = stmts[0]
    kind, body = _only(raw.get("stmt"))
    if kind != "SelectStmt":
        raise UnsafeQuery(r.NOT_A_SELECT, "only SELECT queries are accepted")
    walker = _Walker(b, rules, schema, functions, max_depth, allow_recursive)
    try:
        walker.node(kind, body, frozenset(), 0)
    except RecursionError:
        raise UnsafeQuery(r.TOO_COMPLEX, "query nests too deeply") from None
    start = int(raw.get("stmt_location", 0))
    length = int(raw.get("stmt_len", 0))
    end = start + length if length else len(b)
    return walker.result, start, end
