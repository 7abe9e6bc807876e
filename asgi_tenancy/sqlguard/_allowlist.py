"""What a guarded query may call: functions, set-returning functions, operators and types.

Allow-lists only: a name that is not here is refused, whatever the notation (``f(x)``,
``x.f``, ``(x).f``, ``FROM f(x)``, a cast), including everything added to the database later.
Every name is a built-in of ``pg_catalog`` that computes on its arguments alone: it reads no
table, catalog, statistics, setting, file or other session, keeps no state past the statement,
and signals no one. The rewrite qualifies every function and type with ``pg_catalog.``, so a
same-named object in another schema is never reached.
"""

from __future__ import annotations

__all__ = [
    "FUNCTIONS",
    "OPERATORS",
    "SET_RETURNING",
    "SQL_VALUE_FUNCTIONS",
    "TYPES",
]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_AGGREGATES = _words(
    """
    count sum avg min max string_agg array_agg bool_and bool_or every
    stddev stddev_pop stddev_samp variance var_pop var_samp
    percentile_cont percentile_disc mode corr covar_pop covar_samp
    regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
    bit_and bit_or bit_xor json_agg jsonb_agg json_object_agg jsonb_object_agg any_value
    json_agg_strict jsonb_agg_strict json_object_agg_strict jsonb_object_agg_strict
    json_object_agg_unique jsonb_object_agg_unique json_object_agg_unique_strict
    jsonb_object_agg_unique_strict grouping
    """
)
_WINDOW = _words(
    """
    row_number rank dense_rank percent_rank cume_dist ntile lag lead
    first_value last_value nth_value
    """
)
_ARITHMETIC = _words(
    """
    abs ceil ceiling floor round trunc sign sqrt cbrt power pow exp ln log log10 mod div
    pi degrees radians width_bucket gcd lcm factorial scale min_scale trim_scale random
    random_normal sin cos tan asin acos atan atan2 sind cosd tand asind acosd atand atan2d
    sinh cosh tanh asinh acosh atanh cot cotd
    """
)
_STRING = _words(
    """
    length char_length character_length octet_length bit_length lower upper initcap
    btrim ltrim rtrim lpad rpad substr substring position strpos overlay replace
    concat concat_ws left right repeat reverse split_part starts_with translate
    regexp_replace regexp_match regexp_like regexp_count regexp_instr regexp_substr
    regexp_split_to_array md5 sha224 sha256 sha384 sha512 ascii chr to_char to_number to_hex
    format quote_ident quote_literal quote_nullable encode decode convert_from convert_to
    normalize is_normalized unistr like_escape similar_to_escape similar_escape
    string_to_array array_to_string array_length array_lower array_upper array_ndims
    array_dims cardinality array_position array_positions array_append array_prepend
    array_cat array_remove array_replace array_fill trim_array
    gen_random_uuid
    """
)
_JSON = _words(
    """
    to_json to_jsonb row_to_json array_to_json json_build_object jsonb_build_object
    json_build_array jsonb_build_array json_object jsonb_object
    json_array_length jsonb_array_length json_typeof jsonb_typeof
    json_extract_path json_extract_path_text jsonb_extract_path jsonb_extract_path_text
    json_strip_nulls jsonb_strip_nulls jsonb_set jsonb_set_lax jsonb_insert jsonb_pretty
    jsonb_path_exists jsonb_path_match jsonb_path_query_array jsonb_path_query_first
    """
)
_FULL_TEXT = _words(
    """
    to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery
    ts_rank ts_rank_cd ts_headline setweight strip numnode querytree tsvector_to_array
    array_to_tsvector ts_delete ts_filter tsquery_phrase
    """
)
_DATETIME = _words(
    """
    now date_trunc date_part extract age date_bin make_date make_time make_timestamp
    make_timestamptz make_interval justify_days justify_hours justify_interval
    clock_timestamp statement_timestamp transaction_timestamp timeofday timezone isfinite
    to_date to_timestamp overlaps date date_add date_subtract
    """
)
_CONDITIONAL = _words("num_nulls num_nonnulls")
# Function-style casts between allowed types (``int4(x)``, ``text(x)``).
_CASTS = _words("int2 int4 int8 float4 float8 numeric text bool varchar bpchar timestamp")

# Set-returning functions allowed in FROM, with the columns they add. ``None``: a single column
# named like the relation (alias, else the function); a tuple: fixed output columns; ``()``:
# the columns depend on the arguments or a column definition list, so only aliases are known.
SET_RETURNING: dict[str, tuple[str, ...] | None] = {
    "generate_series": None,
    "generate_subscripts": None,
    "regexp_matches": None,
    "regexp_split_to_table": None,
    "string_to_table": None,
    "json_object_keys": None,
    "jsonb_object_keys": None,
    "jsonb_path_query": None,
    "json_array_elements": ("value",),
    "jsonb_array_elements": ("value",),
    "json_array_elements_text": ("value",),
    "jsonb_array_elements_text": ("value",),
    "json_each": ("key", "value"),
    "jsonb_each": ("key", "value"),
    "json_each_text": ("key", "value"),
    "jsonb_each_text": ("key", "value"),
    "unnest": (),  # unnest(tsvector) returns three columns
    "json_to_record": (),
    "jsonb_to_record": (),
    "json_to_recordset": (),
    "jsonb_to_recordset": (),
}

FUNCTIONS = (
    _AGGREGATES
    | _WINDOW
    | _ARITHMETIC
    | _STRING
    | _JSON
    | _FULL_TEXT
    | _DATETIME
    | _CONDITIONAL
    | _CASTS
    | frozenset(SET_RETURNING)
)

# SQL-standard keywords that look like constants; those naming users, roles, schemas and
# databases are refused (they describe the deployment, not the tenant's data).
SQL_VALUE_FUNCTIONS: dict[str, str] = {
    "SVFOP_CURRENT_DATE": "current_date",
    "SVFOP_CURRENT_TIME": "current_time",
    "SVFOP_CURRENT_TIME_N": "current_time",
    "SVFOP_CURRENT_TIMESTAMP": "current_timestamp",
    "SVFOP_CURRENT_TIMESTAMP_N": "current_timestamp",
    "SVFOP_LOCALTIME": "localtime",
    "SVFOP_LOCALTIME_N": "localtime",
    "SVFOP_LOCALTIMESTAMP": "localtimestamp",
    "SVFOP_LOCALTIMESTAMP_N": "localtimestamp",
}

# Operator symbols (pg_catalog's implementations: arithmetic, comparison, text, pattern,
# arrays, JSON, ranges, full-text search, bits). ``!=`` reaches the parser as ``<>``.
OPERATORS = _words(
    """
    + - * / % ^ |/ ||/ @ & | # ~ << >> = <> < > <= >=
    || ~* !~ !~* ~~ ~~* !~~ !~~* ^@
    -> ->> #> #>> @> <@ ? ?| ?& #- @? @@ @@@ && !! <-> &< &> -|-
    """
)

# Type names (pg_catalog's ``typname``) allowed in casts, typed literals and column
# definition lists, and their arrays. Never ``reg*`` (catalog lookups), never a table's row
# type, never a pseudo-type.
TYPES = _words(
    """
    bool int2 int4 int8 float4 float8 numeric money text varchar bpchar
    date time timetz timestamp timestamptz interval
    json jsonb jsonpath uuid bytea bit varbit tsvector tsquery
    int4range int8range numrange daterange tsrange tstzrange
    int4multirange int8multirange nummultirange datemultirange tsmultirange tstzmultirange
    """
)
