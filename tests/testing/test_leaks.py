"""The test kit can fail: each probe on correct and deliberately leaky set-ups (leaky.py).

A probe that passes on everything proves nothing. For every set-up and every probe the kit
generates for it, the outcome is asserted exactly: passes, reports a LEAK naming the probe, or
reports a CONTROL failure naming the probe. Then the generated tests themselves, run by
pytest (``pytester``), fail on a leaky set-up with the probe in the test id and pass on the
correct one.
"""

from __future__ import annotations

import asyncio

import pytest

from asgi_tenancy.errors import IsolationConfigError
from asgi_tenancy.sqlalchemy import TenantDatabase
from asgi_tenancy.testing import PROBES, KitDatabases, LeakFound, run_probe
from asgi_tenancy.testing.leaks import skip_reason
from tests.conftest import PgServer
from tests.testing.leaky import SETUPS, Setup

pytest_plugins = ["asgi_tenancy.testing", "pytester"]


@pytest.fixture(scope="session")
def tenancy_database_url(pg_server: PgServer) -> str:
    return pg_server.admin_url.render_as_string(hide_password=False)


def _probes(setup: Setup) -> list[str]:
    return [p for p in PROBES if skip_reason(setup.kit, setup.model, p) is None]


CASES = [
    pytest.param(setup, probe, id=f"{setup.name}-{probe}")
    for setup in SETUPS.values()
    for probe in _probes(setup)
]


def test_every_probe_has_an_expectation() -> None:
    for setup in SETUPS.values():
        assert set(_probes(setup)) <= set(setup.expected), setup.name
    leaky = [s for s in SETUPS.values() if "leak" in s.expected.values()]
    # Each probe is shown to catch a leak on at least one set-up.
    assert {p for s in leaky for p in _probes(s) if s.expected[p] == "leak"} == set(PROBES)


@pytest.mark.parametrize(("setup", "probe"), CASES)
def test_probe_outcome(setup: Setup, probe: str, tenancy_databases: KitDatabases) -> None:
    expected = setup.expected[probe]
    table = setup.model.__table__.name
    with tenancy_databases.use(setup.kit) as harness:
        if expected == "pass":
            asyncio.run(run_probe(harness, setup.model, probe))
            return
        with pytest.raises(LeakFound) as caught:
            asyncio.run(run_probe(harness, setup.model, probe))
    prefix = "LEAK" if expected == "leak" else "CONTROL"
    message = str(caught.value)
    assert message.startswith(f"{prefix} Note ({table}), {probe}"), message
    if expected == "leak":
        kind = message.removeprefix(f"LEAK Note ({table}), {probe}").split(":", 1)[0]
        assert kind.strip(" ()") in KINDS[probe], message


# The ways each probe attacks, as its LEAK message names them (leaks.py, docs/testing.md).
KINDS = {
    "read": {""},
    "update": {"by key", "of every row"},
    "delete": {"by key"},
    "insert": {"forged"},
    "move": {"by UPDATE", "on a loaded object"},
}


@pytest.mark.parametrize("name", [s.name for s in SETUPS.values() if s.strict is not None])
def test_start_up_checks_refuse_the_unchecked_set_ups(
    name: str, tenancy_databases: KitDatabases
) -> None:
    """The set-ups that skip the library's checks would not start with them: an application's
    generated tests fail there too, before any probe."""
    setup = SETUPS[name]
    assert setup.strict is not None
    harness = tenancy_databases.prepare(setup.kit)

    async def validate() -> None:
        database = TenantDatabase(harness.app_url, setup.strict())  # type: ignore[misc]
        try:
            await database.validate()
        finally:
            await database.dispose()

    with pytest.raises(IsolationConfigError):
        asyncio.run(validate())


_GENERATED = """
from asgi_tenancy.testing import leak_tests
from tests.testing.leaky import SETUPS

pytest_plugins = ["asgi_tenancy.testing"]

test_leaky = leak_tests(SETUPS["rls_open_policy"].kit)
test_correct = leak_tests(SETUPS["rls_correct"].kit)
"""


def test_generated_tests_fail_on_a_leak_and_pass_without(
    pytester: pytest.Pytester, pg_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "TENANCY_TEST_DATABASE_URL", pg_server.admin_url.render_as_string(hide_password=False)
    )
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_generated=_GENERATED)
    recorder = pytester.inline_run("-p", "no:cacheprovider")
    reports = {
        r.nodeid.split("::")[-1]: r
        for r in recorder.getreports("pytest_runtest_logreport")
        if r.when == "call"
    }
    for probe in PROBES:
        leaky, correct = (
            reports[f"test_leaky[Note-{probe}]"],
            reports[f"test_correct[Note-{probe}]"],
        )
        assert correct.passed, correct.longreprtext
        assert leaky.failed
        assert "LeakFound" in leaky.longreprtext
        assert f"LEAK Note (notes), {probe}" in leaky.longreprtext
    assert len(reports) == 2 * len(PROBES)
