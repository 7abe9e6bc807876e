"""The differential oracle over the fixed corpus of reporting queries, for every tenant."""

from __future__ import annotations

from tests.sqlguard.corpus import QUERIES, TENANTS
from tests.sqlguard.oracle import Oracle


def test_corpus_is_large_enough() -> None:
    assert len(QUERIES) >= 100
    assert len(set(QUERIES)) == len(QUERIES)


def test_every_corpus_query_returns_exactly_the_tenants_rows(oracle: Oracle) -> None:
    rows = 0
    for sql in QUERIES:
        for tenant in TENANTS:
            rows += oracle.check(sql, tenant)
    assert oracle.compared == len(QUERIES) * len(TENANTS)
    # the oracle compares data, not empty results
    assert oracle.nonempty >= 0.9 * oracle.compared
    assert rows > 3_000


def test_tenants_see_different_data_through_the_same_query(oracle: Oracle) -> None:
    counts = {t: oracle.check("SELECT * FROM orders", t) for t in TENANTS}
    assert len(set(counts.values())) == len(TENANTS)
