"""Which functions, set-returning functions and SQL value functions a guarded query may call.

An allow-list: whatever is not named here is refused, including functions added to the
database later. Every name is a built-in of PostgreSQL's ``pg_catalog`` that reads no table,
no catalog, no setting and no file, and writes nothing.
"""

from __future__ import annotations

import re

__all__ = [
    "DEFAULT_FUNCTIONS",
    "NEVER_ALLOWED",
    "SET_RETURNING_FUNCTIONS",
    "SQL_VALUE_FUNCTIONS",
]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


AGGREGATES = _words(
    """
    count sum avg min max string_agg array_agg bool_and bool_or every
    stddev stddev_pop stddev_samp variance var_pop var_samp
    percentile_cont percentile_disc mode corr covar_pop covar_samp
    regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
    bit_and bit_or bit_xor json_agg jsonb_agg json_object_agg jsonb_object_agg any_value
    """
)
WINDOW = _words(
    """
    row_number rank dense_rank percent_rank cume_dist ntile lag lead
    first_value last_value nth_value
    """
)
ARITHMETIC = _words(
    """
    abs ceil ceiling floor round trunc sign sqrt cbrt power pow exp ln log log10 mod div
    pi degrees radians width_bucket gcd lcm factorial scale min_scale trim_scale random
    """
)
STRING = _words(
    """
    length char_length character_length octet_length bit_length lower upper initcap
    btrim ltrim rtrim lpad rpad substr substring position strpos overlay replace
    concat concat_ws left right repeat reverse split_part starts_with translate
    regexp_replace regexp_match regexp_like regexp_count regexp_instr regexp_substr
    regexp_split_to_array md5 ascii chr to_char to_number to_hex format
    string_to_array array_to_string array_length array_lower array_upper cardinality
    array_position array_positions array_append array_prepend array_cat array_remove
    array_replace normalize unistr
    to_json to_jsonb json_build_object jsonb_build_object json_build_array jsonb_build_array
    json_array_length jsonb_array_length json_typeof jsonb_typeof
    json_extract_path json_extract_path_text jsonb_extract_path jsonb_extract_path_text
    jsonb_strip_nulls jsonb_set jsonb_insert jsonb_pretty
    """
)
DATETIME = _words(
    """
    now date_trunc date_part extract age date_bin make_date make_time make_timestamp
    make_timestamptz make_interval justify_days justify_hours justify_interval
    clock_timestamp statement_timestamp transaction_timestamp timezone isfinite
    to_date to_timestamp overlaps
    """
)
CONDITIONAL = _words("num_nulls num_nonnulls")

SET_RETURNING_FUNCTIONS = _words(
    """
    generate_series unnest jsonb_array_elements jsonb_array_elements_text json_array_elements
    json_array_elements_text jsonb_each jsonb_each_text json_each json_each_text
    regexp_matches regexp_split_to_table string_to_table
    """
)

DEFAULT_FUNCTIONS = (
    AGGREGATES | WINDOW | ARITHMETIC | STRING | DATETIME | CONDITIONAL | SET_RETURNING_FUNCTIONS
)

# SQL-standard keywords that look like constants; the ones naming users, roles, schemas and
# databases are refused (they describe the deployment, not the tenant's data).
SQL_VALUE_FUNCTIONS = frozenset(
    {
        "SVFOP_CURRENT_DATE",
        "SVFOP_CURRENT_TIME",
        "SVFOP_CURRENT_TIME_N",
        "SVFOP_CURRENT_TIMESTAMP",
        "SVFOP_CURRENT_TIMESTAMP_N",
        "SVFOP_LOCALTIME",
        "SVFOP_LOCALTIME_N",
        "SVFOP_LOCALTIMESTAMP",
        "SVFOP_LOCALTIMESTAMP_N",
    }
)

# Refused even when an application adds them to its allow-list: they read or write settings,
# the catalog, large objects, files or other databases.
NEVER_ALLOWED = re.compile(
    r"(pg_|dblink|lo_|set_config\Z|current_setting\Z|query_to_xml|table_to_xml|"
    r"cursor_to_xml|schema_to_xml|database_to_xml|has_|txid_|current_|session_user\Z|"
    r"inet_|version\Z|col_description|obj_description|shobj_description|format_type\Z|"
    r"to_reg|nextval\Z|currval\Z|setval\Z|lastval\Z|row_security_active\Z)"
)
