"""The stable reason codes an ``UnsafeQuery`` from the SQL guard carries."""

from __future__ import annotations

__all__ = ["REASONS"]

PARSE_ERROR = "parse_error"
INVALID_TEXT = "invalid_text"
EMPTY_QUERY = "empty_query"
MULTIPLE_STATEMENTS = "multiple_statements"
NOT_A_SELECT = "not_a_select"
UNKNOWN_TABLE = "unknown_table"
UNKNOWN_COLUMN = "unknown_column"
SCHEMA_NOT_ALLOWED = "schema_not_allowed"
FORBIDDEN_FUNCTION = "forbidden_function"
FORBIDDEN_OPERATOR = "forbidden_operator"
FORBIDDEN_TYPE = "forbidden_type"
LOCKING_CLAUSE = "locking_clause"
DATA_MODIFYING_CTE = "data_modifying_cte"
PARAMETER_NOT_ALLOWED = "parameter_not_allowed"
TOO_COMPLEX = "too_complex"
UNSUPPORTED_SYNTAX = "unsupported_syntax"

REASONS: frozenset[str] = frozenset(
    {
        PARSE_ERROR,
        INVALID_TEXT,
        EMPTY_QUERY,
        MULTIPLE_STATEMENTS,
        NOT_A_SELECT,
        UNKNOWN_TABLE,
        UNKNOWN_COLUMN,
        SCHEMA_NOT_ALLOWED,
        FORBIDDEN_FUNCTION,
        FORBIDDEN_OPERATOR,
        FORBIDDEN_TYPE,
        LOCKING_CLAUSE,
        DATA_MODIFYING_CTE,
        PARAMETER_NOT_ALLOWED,
        TOO_COMPLEX,
        UNSUPPORTED_SYNTAX,
    }
)
