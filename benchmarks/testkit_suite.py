"""The test kit inside real pytest runs: a suite of kit tenant tests against a suite of plain ones.

``benchmarks/testkit.py`` times one test body in a loop and waits for the kit's reset at the end
of every test. A real suite runs under pytest, whose own work between two tests (reports, hooks,
the next test's set-up) overlaps the reset the kit starts in the background. This benchmark
measures that case: it writes a small test project (the example app's models, the plugin loaded
the way docs/testing.md says, one event loop for the session), and runs it with pytest in
separate processes, alternating:

- ``plain``: ``TESTS`` tests, each a transaction rolled back at the end, as the table owner;
- ``kit``: the same number of tests through the ``tenancy`` fixture: the app's
  ``TenantDatabase`` as the app role, a tenant scope, a commit, the seeded rows put back.

Per test, two figures: ``phases`` (set-up + call + tear-down, as pytest reports them: what a
test costs where pytest is not at work) and ``wall`` (from one test's start to the next one's:
what a suite pays per test, pytest included). Medians over every test of ``ROUNDS`` runs; the
first ``WARM_UP`` tests of each run are left out (engines, the clone, the first validation).
``python -m benchmarks.testkit_suite [row query schema database]`` prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from asgi_tenancy.testing import KitServer
from benchmarks.common import machine, median, postgres
from benchmarks.testkit import _plain_database

ROUNDS, TESTS, WARM_UP = 3, 300, 20
if os.environ.get("KIT_SUITE_QUICK"):
    ROUNDS, TESTS, WARM_UP = 1, 40, 10
ROOT = Path(__file__).resolve().parent.parent

PYTEST_INI = """\
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""

CONFTEST = '''\
import json
import os
import time
from functools import partial

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from asgi_tenancy.testing import TenancyKit
from examples.fastapi_app.models import Base
from examples.fastapi_app.provision import strategy_for

pytest_plugins = ["asgi_tenancy.testing"]

KIT = TenancyKit(
    models=Base,
    strategy=partial(strategy_for, os.environ["KIT_ISOLATION"]),
    name="bench_suite_" + os.environ["KIT_ISOLATION"],
)


@pytest.fixture(scope="session")
def tenancy_kit():
    return KIT


@pytest.fixture(scope="session")
async def plain_engine():
    engine = create_async_engine(os.environ["KIT_PLAIN_URL"], pool_size=2, max_overflow=0)
    yield engine
    await engine.dispose()


@pytest.fixture
async def plain_session(plain_engine):
    """The usual rollback-per-test fixture."""
    async with plain_engine.connect() as conn:
        transaction = await conn.begin()
        async with AsyncSession(bind=conn) as session:
            yield session
        await transaction.rollback()


PHASES = {}
WHEN = {"setup": [], "call": [], "teardown": []}
STARTS = []


def pytest_runtest_logstart(nodeid, location):
    STARTS.append(time.perf_counter())


def pytest_runtest_logreport(report):
    PHASES[report.nodeid] = PHASES.get(report.nodeid, 0.0) + report.duration
    WHEN[report.when].append(report.duration)
    if report.failed:
        raise SystemExit(f"{report.nodeid} failed: {report.longreprtext[-2000:]}")


def pytest_sessionfinish(session):
    STARTS.append(time.perf_counter())
    walls = [b - a for a, b in zip(STARTS, STARTS[1:])]
    with open(os.environ["KIT_OUT"], "w") as out:
        json.dump({"phases": list(PHASES.values()), "wall": walls, **WHEN}, out)
'''

TESTS_MODULE = """\
import os

import pytest

from asgi_tenancy import tenant_scope
from benchmarks.testkit import body

KIND = os.environ["KIT_KIND"]
N = int(os.environ["KIT_TESTS"])


@pytest.mark.skipif(KIND != "plain", reason="the other suite")
@pytest.mark.parametrize("n", range(N))
async def test_plain(plain_session, n):
    await body(plain_session, 10_000 + n, "acme")


@pytest.mark.skipif(KIND != "kit", reason="the other suite")
@pytest.mark.parametrize("n", range(N))
async def test_kit(tenancy, n):
    async with tenancy.database() as database:
        async with tenant_scope(tenancy.a), tenancy.session(database) as session:
            await body(session, 10_000 + n, None)
            await session.commit()
"""


def _project() -> Path:
    project = Path(tempfile.mkdtemp(prefix="tenancy-kit-suite-"))
    (project / "pytest.ini").write_text(PYTEST_INI)
    (project / "conftest.py").write_text(CONFTEST)
    (project / "test_suite.py").write_text(TESTS_MODULE)
    return project


def _run(project: Path, kind: str, isolation: str, server_url: str, plain_url: str) -> Any:
    out = project / f"{kind}.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TENANCY_TEST_DATABASE_URL": server_url,
        "KIT_ISOLATION": isolation,
        "KIT_KIND": kind,
        "KIT_TESTS": str(TESTS),
        "KIT_PLAIN_URL": plain_url,
        "KIT_OUT": str(out),
    }
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", f"test_{kind}"],
        cwd=project,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())


def measure(server_url: str, plain_url: str, isolation: str) -> dict[str, Any]:
    project = _project()
    found: dict[str, dict[str, list[float]]] = {
        kind: {"phases": [], "wall": []} for kind in ("plain", "kit")
    }
    for round_ in range(ROUNDS):
        kinds = ("plain", "kit") if round_ % 2 == 0 else ("kit", "plain")
        for kind in kinds:
            figures = _run(project, kind, isolation, server_url, plain_url)
            for name in ("phases", "wall", "setup", "call", "teardown"):
                found[kind].setdefault(name, []).extend(figures[name][WARM_UP:])
    result: dict[str, Any] = {}
    for name in ("phases", "wall"):
        plain, kit = median(found["plain"][name]), median(found["kit"][name])
        result[name] = {
            "plain_ms": round(plain * 1000, 3),
            "kit_ms": round(kit * 1000, 3),
            "ratio": round(kit / plain, 3),
        }
    result["phases_ms"] = {
        kind: {
            when: round(median(found[kind][when]) * 1000, 3)
            for when in ("setup", "call", "teardown")
        }
        for kind in ("plain", "kit")
    }
    result["tests_per_contender"] = ROUNDS * (TESTS - WARM_UP)
    return result


def main(names: list[str]) -> dict[str, object]:
    results: dict[str, object] = {
        "machine": machine(),
        "target_ratio": 1.5,
        "rounds": ROUNDS,
        "tests_per_run": TESTS,
    }
    with postgres() as url:
        server_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
        plain_url = asyncio.run(_plain_database(KitServer(server_url), "bench_suite_plain"))
        for name in names:
            results[name] = measure(server_url, plain_url, name)
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:] or ["row", "query", "schema", "database"]), indent=2))
