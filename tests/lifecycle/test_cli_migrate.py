"""``asgi-tenancy migrate``: run as a real process against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from asgi_tenancy.cli import main
from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.operations.migrations import (
    MigrationReport,
    MigrationResult,
    MigrationStatus,
    env_template,
)
from asgi_tenancy.operations.progress import BarProgress, LineProgress, progress_for
from tests.conftest import PgDatabase
from tests.lifecycle.migration_scripts import (
    R2,
    add_tenants,
    make_provisioner,
    schema_of,
    version_of,
    write_project,
)

_APP_MODULE = """
import os

from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy.sqlalchemy import SchemaPerTenant, tenants_table
from asgi_tenancy.operations import TenantProvisioner


def provisioner():
    return TenantProvisioner(
        create_async_engine(os.environ["MIGRATE_TEST_URL"]),
        SchemaPerTenant(shared_schema=None),
        app_role="tenancy_app",
        table=tenants_table(name=os.environ["MIGRATE_TEST_TABLE"]),
    )
"""


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


@dataclass
class Project:
    root: Path
    provisioner: TenantProvisioner
    url: str

    async def run(self, *args: str, ci: bool = True, url: str | None = None) -> Run:
        env = {
            **os.environ,
            "MIGRATE_TEST_URL": url or self.url,
            "MIGRATE_TEST_TABLE": self.provisioner.table.name,
            "TENANCY_APP": "tenancy_app:provisioner",
            "CI": "true" if ci else "",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "asgi_tenancy.cli",
            "migrate",
            *args,
            cwd=self.root,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode is not None
        return Run(process.returncode, out.decode(), err.decode())


@pytest.fixture
async def project(tmp_path: Path, admin_engine: AsyncEngine, pg_database: PgDatabase) -> Project:
    write_project(tmp_path)
    (tmp_path / "tenancy_app.py").write_text(_APP_MODULE)
    return Project(tmp_path, await make_provisioner(admin_engine), pg_database.admin_url)


async def _break(project: Project, tenant_schema: str) -> None:
    async with project.provisioner.admin_engine.begin() as conn:
        await conn.execute(sa.text(f'CREATE TABLE "{tenant_schema}".prices (note text)'))


async def test_all_with_json_reports_every_tenant_and_a_rerun_skips(project: Project) -> None:
    tenants = await add_tenants(project.provisioner, 3)
    first = await project.run("--all", "--json", "--concurrency", "2")
    assert first.code == 0, first.stderr
    body = json.loads(first.stdout)
    assert body["ok"] is True
    assert body["head"] == R2
    assert body["concurrency"] == 2
    assert {t["tenant_id"]: t["status"] for t in body["tenants"]} == {t.id: "ok" for t in tenants}
    assert all(t["to_revision"] == R2 and t["error"] is None for t in body["tenants"])
    again = json.loads((await project.run("--all", "--json")).stdout)
    assert [t["status"] for t in again["tenants"]] == ["skipped"] * 3
    assert again["counts"]["skipped"] == 3


async def test_plain_lines_in_ci_and_exit_status_one_when_a_tenant_fails(
    project: Project,
) -> None:
    good, bad = sorted(await add_tenants(project.provisioner, 2), key=lambda t: t.id)
    await _break(project, schema_of(project.provisioner, bad))
    run = await project.run("--all", "--concurrency", "1")
    assert run.code == 1
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3  # one per tenant, then the summary
    assert lines[0].startswith(f"{good.id} ok base -> {R2} (")
    assert lines[1].startswith(f"{bad.id} failed base -> base (")
    assert "prices" in lines[1]
    assert "\r" not in run.stdout
    assert lines[2].startswith("ok 1, failed 1 in ")
    assert project.url.split("@")[0] not in run.stdout + run.stderr  # no credentials


async def test_dry_run_changes_nothing(project: Project) -> None:
    (tenant,) = await add_tenants(project.provisioner, 1)
    run = await project.run("--all", "--dry-run", "--json")
    assert run.code == 0
    assert json.loads(run.stdout)["tenants"][0]["status"] == "dry-run"
    async with project.provisioner.admin_engine.connect() as conn:
        assert await version_of(conn, schema_of(project.provisioner, tenant)) is None


async def test_canary_failure_leaves_the_rest_unrun(project: Project) -> None:
    tenants = sorted(await add_tenants(project.provisioner, 3), key=lambda t: t.id)
    await _break(project, schema_of(project.provisioner, tenants[0]))
    run = await project.run("--all", "--canary", "1", "--concurrency", "1", "--json")
    assert run.code == 1
    statuses = [t["status"] for t in json.loads(run.stdout)["tenants"]]
    assert statuses == ["failed", "not-run", "not-run"]
    async with project.provisioner.admin_engine.connect() as conn:
        for tenant in tenants[1:]:
            assert await version_of(conn, schema_of(project.provisioner, tenant)) is None


async def test_one_tenant_by_id(project: Project) -> None:
    one, other = await add_tenants(project.provisioner, 2)
    run = await project.run(one.id, "--json")
    assert run.code == 0, run.stderr
    assert [t["tenant_id"] for t in json.loads(run.stdout)["tenants"]] == [one.id]
    async with project.provisioner.admin_engine.connect() as conn:
        assert await version_of(conn, schema_of(project.provisioner, one)) == R2
        assert await version_of(conn, schema_of(project.provisioner, other)) is None


async def test_unknown_tenant_and_missing_config_are_usage_errors(project: Project) -> None:
    unknown = await project.run("nobody")
    assert unknown.code == 2
    assert "isolation_config" in unknown.stderr
    missing = await project.run("--all", "--config", "nowhere.ini")
    assert missing.code == 2
    assert "Traceback" not in missing.stderr


def test_print_env_template() -> None:
    out = io.StringIO()
    assert main(["migrate", "--print-env-template"], out=out) == 0
    assert out.getvalue() == env_template()


def test_tenant_or_all_is_required() -> None:
    assert main(["migrate", "--app", "x:y"]) == 2
    assert main(["migrate", "--app", "x:y", "--all", "acme"]) == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _report(*results: MigrationResult) -> MigrationReport:
    return MigrationReport(results, R2, duration_s=0.5)


def test_a_terminal_gets_a_bar_and_ci_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert isinstance(progress_for(_Terminal(), json_output=False), BarProgress)
    assert isinstance(progress_for(io.StringIO(), json_output=False), LineProgress)
    monkeypatch.setenv("CI", "true")
    assert isinstance(progress_for(_Terminal(), json_output=False), LineProgress)


def test_bar_redraws_in_place_and_prints_failures() -> None:
    stream = _Terminal()
    bar = BarProgress(stream)
    bar.begin(2)
    ok = MigrationResult("a", MigrationStatus.OK, None, R2)
    failed = MigrationResult("b", MigrationStatus.FAILED, None, None, "DuplicateTable: x")
    bar.finished(ok)
    bar.finished(failed)
    bar.close(_report(ok, failed))
    text = stream.getvalue()
    assert "\r\x1b[K[" + "#" * 15 + "." * 15 + "] 1/2 failed 0" in text
    assert "b failed: DuplicateTable: x\n" in text
    assert text.endswith("ok 1, failed 1 in 0.50s (head r2_price)\n")


def test_the_package_and_the_cli_load_neither_alembic_nor_sqlalchemy() -> None:
    import subprocess

    code = (
        "import sys, asgi_tenancy, asgi_tenancy.cli\n"
        "asgi_tenancy.cli.build_parser()\n"
        "print(','.join(m for m in ('alembic', 'sqlalchemy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


async def test_an_unreachable_registry_is_one_line_without_credentials(project: Project) -> None:
    url = "postgresql+asyncpg://owner:hunter2@127.0.0.1:9/nowhere"  # the discard port: refused
    run = await project.run("--all", url=url)
    assert run.code == 2
    assert run.stderr.startswith("error (database_unavailable): ")
    assert "Traceback" not in run.stderr
    assert "hunter2" not in run.stdout + run.stderr


async def test_adopt_stamps_tenants_without_a_version_table(project: Project) -> None:
    (tenant,) = await add_tenants(project.provisioner, 1)
    run = await project.run("--all", "--adopt", "--json")
    assert run.code == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["tenants"][0]["status"] == "stamped"
    assert body["counts"]["stamped"] == 1
    async with project.provisioner.admin_engine.connect() as conn:
        assert await version_of(conn, schema_of(project.provisioner, tenant)) == R2


async def test_dry_run_predicts_already_exists_per_tenant_and_the_run_agrees(
    project: Project,
) -> None:
    made = await add_tenants(project.provisioner, 3, prefix="made")
    empty = await add_tenants(project.provisioner, 1, prefix="empty")
    async with project.provisioner.admin_engine.begin() as conn:
        for tenant in made:  # tables from metadata, no version table: the first step meets them
            schema = schema_of(project.provisioner, tenant)
            await conn.execute(sa.text(f'CREATE TABLE "{schema}".items (id int)'))
    dry = await project.run("--all", "--dry-run")
    assert dry.code == 1, dry.stderr
    lines = dry.stdout.splitlines()
    for tenant in made:
        [line] = [x for x in lines if x.startswith(f"{tenant.id} ")]
        assert line.startswith(f"{tenant.id} would-fail ")
        assert "'already exists'" in line
        assert "--adopt" in line
    assert next(x for x in lines if x.startswith(f"{empty[0].id} ")).split()[1] == "dry-run"
    assert "would-fail 3" in lines[-1]
    body = json.loads((await project.run("--all", "--dry-run", "--json")).stdout)
    assert body["counts"]["would-fail"] == 3
    adopting = await project.run("--all", "--dry-run", "--adopt", "--json")
    assert adopting.code == 0
    assert json.loads(adopting.stdout)["counts"]["would-fail"] == 0
    # The prediction is the run's outcome: the same tenants fail, on "already exists".
    real = json.loads((await project.run("--all", "--json")).stdout)
    failed = {t["tenant_id"] for t in real["tenants"] if t["status"] == "failed"}
    assert failed == {t.id for t in made}
    assert all("already exists" in t["error"] for t in real["tenants"] if t["status"] == "failed")
