"""schemathesis (``--checks all``) against the example app, served by uvicorn, per strategy.

With a valid tenant header under each strategy, and with no credentials at all (schemathesis
then makes up the header and the token) under one. No server error, no undocumented status or
content type, no response that breaks its schema; the few deviations the library's contract
makes are listed in ``ACCEPTED`` with their reason, and each must be a 400.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from examples.fastapi_app.app import create_app
from examples.fastapi_app.provision import open_database
from tests.examples.conftest import SECRET, STRATEGIES, Demo

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 5  # per operation and phase: 10-20 s a run, about 80 s for the 5 runs
SEED = 1 if os.environ.get("CI") else random.randrange(2**16)
LEGS = {
    "tenant header": ["-H", "x-tenant-id: acme"],
    # Without credentials every tenant operation is refused before it runs: the coverage
    # phase's boundary and malformed values say all there is (stateful chains need successes).
    "no credentials": ["--phases", "examples,coverage"],
}

# Tenancy is decided before routing and authentication, and by contract a request that names no
# tenant, or a malformed one, is a 400 problem (TenantContextError, InvalidTenantIdentifier).
# Three checks expect a 401 or a 405 in those places; each accepted failure must be that 400.
ACCEPTED = {
    # ignored_auth: the probe sent without the tenant header gets 400 tenant_context, not 401.
    ("tenant header", "ST401"),
    # missing_required_header: /me with neither token nor header is refused for naming no
    # tenant (400) before the route can ask for the token (401).
    ("no credentials", "ST203"),
    # unsupported_method: TRACE with a made-up, malformed tenant header: 400 before 405.
    ("no credentials", "ST204"),
}


class _Server(uvicorn.Server):
    """uvicorn in a thread (no signal handlers there), with an event set once it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


@pytest.fixture(scope="module")
def served(demo: Demo) -> Iterator[str]:
    """The example app on 127.0.0.1, its lifespan (validation) run as a server runs it."""
    database, store = open_database(demo.db.admin_url, demo.isolation)
    app = create_app(database, store, jwt_secret=SECRET)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.ready.wait(timeout=0.1):
            assert thread.is_alive(), "the example app did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


# Without credentials the middleware refuses before any strategy code runs: one strategy is
# enough for that leg.
RUNS = [*((isolation, "tenant header") for isolation in STRATEGIES), ("row", "no credentials")]


@pytest.mark.parametrize(("demo", "leg"), RUNS, indirect=["demo"])
def test_schemathesis_finds_no_server_error_nor_schema_violation(
    served: str, leg: str, demo: Demo, tmp_path: Path
) -> None:
    events, summary = tmp_path / "events.ndjson", tmp_path / "summary.json"
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(CONFIG)),
        *("run", f"{served}/openapi.json", "--checks", "all", "--workers", "1"),
        *("--max-examples", str(EXAMPLES), "--seed", str(SEED), "--report", "json,ndjson"),
        *("--report-ndjson-path", str(events), "--report-json-path", str(summary)),
        *LEGS[leg],
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = json.loads(summary.read_text())
    where = f"{demo.isolation}, {leg}, seed {SEED}:\n{run.stdout[-6000:]}{run.stderr[-2000:]}"
    assert report["errors"] == [], where
    assert report["operations"]["tested"] == report["operations"]["total"] >= 11, where
    assert report["test_cases"]["generated"] > 100, where
    failures = list(_failures(events))
    unexpected = [
        f for f in failures if (leg, f["code"]) not in ACCEPTED or "400" not in f["message"]
    ]
    assert not unexpected, f"{unexpected}\n{where}"
    if not failures:
        assert run.returncode == 0, where


def _failures(events: Path) -> Iterator[dict[str, Any]]:
    """Every failed check of the run (code, operation, message), from the NDJSON event log."""
    for line in events.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if not event or event["status"] != "failure":
            continue
        for checks in event["recorder"]["checks"].values():
            for check in checks:
                if check["status"] == "failure":
                    yield check["failure_info"]["failure"]
