"""The ``asgi-tenancy`` command line: one subcommand group per concern.

- ``sql check``: the guarded query for one tenant, or why it is refused;
- ``tenants list|show|create|suspend|activate|drop``: the application's ``TenantProvisioner``;
- ``tenants move TENANT --to NODE``: a tenant to another Citus node or server, while it serves;
- ``migrate (--all|TENANT)``: Alembic across the shared schema and every tenant;
- ``audit``: the isolation audit of a live database; ``policy``: print or apply the RLS DDL.

Groups register themselves in ``_GROUPS``; each imports its own dependencies lazily. Commands
that act on an application's tenants load its ``TenantProvisioner`` from
``--app module:attribute`` (or ``TENANCY_APP``); the attribute may also be a zero-argument
callable returning one, so building engines can wait until the command runs. ``--json`` prints
one JSON object everywhere; exit codes: 0 ok, 1 refused or findings, 2 usage or connection.
Every usage or connection error is one line on stderr (two with a hint), never a traceback:
``main`` is the one boundary where whatever a command raised becomes that line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    from .operations.provisioning import TenantProvisioner
    from .tenant import Tenant

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, TextIO], int]
CATALOG_STRATEGIES = ("row", "schema", "database")  # asgi_tenancy.operations.audit's too
APP_ENV_VAR = "TENANCY_APP"  # also read by asgi_tenancy.operations.commands


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_app_option(parser: argparse.ArgumentParser) -> None:
    """``--app module:attribute``: where a command finds the application's provisioner."""
    parser.add_argument(
        "--app",
        default=os.environ.get(APP_ENV_VAR),
        metavar="MODULE:ATTRIBUTE",
        help=f"the application's TenantProvisioner (default: ${APP_ENV_VAR})",
    )


def load_provisioner(spec: str | None) -> TenantProvisioner:
    """Import ``module:attribute`` and return the ``TenantProvisioner`` it names (or builds)."""
    from .operations.commands import load_provisioner as load

    return load(spec)


def _table_option(value: str) -> tuple[str, str | None]:
    name, sep, column = value.partition("=")
    if not name or (sep and not column):
        raise argparse.ArgumentTypeError("expected NAME or NAME=TENANT_COLUMN")
    return name, column if sep else None


def _add_sql_group(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sql = commands.add_parser("sql", help="check untrusted SQL with the SQL guard")
    actions = sql.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="print the query rewritten for one tenant, or why it is refused",
        description="Rewrite SQL for one tenant with the SQL guard, or print the refusal.",
    )
    check.add_argument("sql", metavar="SQL", help="the query; '-' reads it from stdin")
    check.add_argument("--tenant", required=True, help="the tenant identifier to bind")
    check.add_argument(
        "--tenant-table",
        action="append",
        default=[],
        type=_table_option,
        metavar="NAME[=COLUMN]",
        help="a tenant table and its tenant column (default: --tenant-column); repeatable",
    )
    check.add_argument(
        "--shared-table",
        action="append",
        default=[],
        metavar="NAME",
        help="a table every tenant may read, unfiltered; repeatable",
    )
    check.add_argument(
        "--tenant-column",
        default="tenant_id",
        metavar="COLUMN",
        help="the tenant column of tenant tables given without one (default: tenant_id)",
    )
    check.add_argument(
        "--schema", default="public", help="the one schema queries may name ('' for none)"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(handler=_sql_check)


def _sql_check(args: argparse.Namespace, out: TextIO) -> int:
    from .context import tenant_scope
    from .errors import TenancyError
    from .sqlguard import SqlGuard, UnsafeQuery
    from .tenant import Tenant

    sql = sys.stdin.read() if args.sql == "-" else args.sql
    try:
        guard = SqlGuard(
            {name: column or args.tenant_column for name, column in args.tenant_table},
            args.shared_table,
            schema=args.schema or None,
        )
        with tenant_scope(Tenant(args.tenant)):
            query = guard.rewrite(sql)
    except UnsafeQuery as exc:
        if args.json:
            body = {"ok": False, "reason": exc.reason, "message": exc.message, "hint": exc.hint}
            print(json.dumps(body), file=out)
        else:
            hint = f"\nhint: {exc.hint}" if exc.hint else ""
            print(f"refused ({exc.reason}): {exc.message}{hint}", file=out)
        return EXIT_REFUSED
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
    if args.json:
        body = {
            "ok": True,
            "sql": query.sql,
            "params": dict(query.params),
            "tables": sorted(query.tables),
        }
        print(json.dumps(body), file=out)
    else:
        print(query.sql.strip(), file=out)
        if query.params:
            print("-- params: " + json.dumps(dict(query.params)), file=out)
    return EXIT_OK


def _attribute_option(value: str) -> tuple[str, str]:
    key, sep, item = value.partition("=")
    if not key or not sep:
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    return key, item


def _add_tenants_group(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenants = commands.add_parser("tenants", help="list, create, suspend and drop tenants")
    actions = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {
        "list": "every registered tenant",
        "show": "one tenant",
        "create": "register a tenant and create its schema or database",
        "suspend": "stop serving a tenant (stores see it after their cache TTL)",
        "activate": "serve a suspended tenant again",
        "drop": "delete a tenant and its schema or database (needs --yes)",
    }
    for name, text in helps.items():
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name != "list":
            action.add_argument("tenant_id", metavar="ID", help="the tenant identifier")
        if name == "create":
            action.add_argument(
                "--attr",
                action="append",
                default=[],
                type=_attribute_option,
                metavar="KEY=VALUE",
                help="a tenant attribute (a string); repeatable",
            )
        if name == "drop":
            action.add_argument("--yes", action="store_true", help="confirm: the data goes too")
        action.add_argument("--json", action="store_true", help="print one JSON object")
        add_app_option(action)
        action.set_defaults(handler=_tenants)
    move = actions.add_parser(
        "move",
        help="move a tenant to another Citus node or PostgreSQL server (it keeps serving)",
        description="Row mode on Citus: isolate the tenant to a shard of its own, then move that "
        "shard group to NODE. Schema mode on Citus: move its distributed schema to NODE. Database "
        "per tenant: copy its database to the server at NODE (an admin URL), verify, switch the "
        "registry, then drop the source. Each step is reported; reads go on throughout.",
    )
    move.add_argument("tenant_id", metavar="ID", help="the tenant identifier")
    move.add_argument(
        "--to", required=True, metavar="NODE", help="host:port, node id, or a server URL"
    )
    move.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    move.add_argument("--json", action="store_true", help="print one JSON object")
    add_app_option(move)
    move.set_defaults(handler=_move)


def _move(args: argparse.Namespace, out: TextIO) -> int:
    from .errors import TenancyError

    try:
        provisioner = load_provisioner(args.app)
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
    return asyncio.run(_run_move(provisioner, args, out))


async def _run_move(provisioner: TenantProvisioner, args: argparse.Namespace, out: TextIO) -> int:
    from .errors import InvalidTenantIdentifier, TenancyError

    try:
        progress = None if args.json else (lambda step: print(step, file=out, flush=True))
        moved = await provisioner.move_tenant(
            args.tenant_id, args.to, dry_run=args.dry_run, progress=progress
        )
    except InvalidTenantIdentifier as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_REFUSED)
    finally:
        await provisioner.admin_engine.dispose()
        await provisioner.strategy.dispose()
    if args.json:
        print(json.dumps({"ok": True, "move": moved.as_dict()}), file=out)
    elif moved.dry_run:
        print(f"would move {moved.tenant_id} from {moved.source} to {moved.target}:", file=out)
        for statement in moved.statements:
            print(f"  {statement}", file=out)
    else:
        print(
            f"moved {moved.tenant_id} from {moved.source} to {moved.target} in"
            f" {moved.seconds} s; rows {dict(moved.rows_after)}",
            file=out,
        )
    return EXIT_OK


def _tenants(args: argparse.Namespace, out: TextIO) -> int:
    return asyncio.run(_run_tenants(load_provisioner(args.app), args, out))


async def _run_tenants(
    provisioner: TenantProvisioner, args: argparse.Namespace, out: TextIO
) -> int:
    from .errors import (
        InvalidTenantIdentifier,
        IsolationConfigError,
        TenancyError,
        TenancyUnavailable,
    )
    from .operations.commands import run_tenants

    try:
        shown = await run_tenants(
            provisioner,
            args.action,
            getattr(args, "tenant_id", None),
            attributes=dict(getattr(args, "attr", ())),
            confirm=getattr(args, "yes", False),
        )
    except (InvalidTenantIdentifier, IsolationConfigError, TenancyUnavailable) as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_REFUSED)
    if args.action == "list":
        _print(args, out, {"tenants": [_tenant_json(t) for t in shown]}, shown)
    elif args.action == "drop":
        _print(args, out, {"dropped": args.tenant_id}, f"dropped {args.tenant_id}")
    else:
        _print(args, out, {"tenant": _tenant_json(shown[0])}, shown)
    return EXIT_OK


def _tenant_json(tenant: Tenant) -> dict[str, object]:
    return {
        "id": tenant.id,
        "status": tenant.status.value,
        "attributes": _masked(tenant.attributes),
    }


def _masked(attributes: Mapping[str, object]) -> dict[str, object]:
    """Attributes for printing: database URLs keep their shape, never their password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = dict(attributes)
    for key, value in shown.items():
        if isinstance(value, str) and "://" in value:
            with contextlib.suppress(ArgumentError, ValueError):  # not a URL: shown as it is
                shown[key] = make_url(value).render_as_string(hide_password=True)
    return shown


def _print(
    args: argparse.Namespace, out: TextIO, body: dict[str, object], text: str | list[Tenant]
) -> None:
    if args.json:
        print(json.dumps({"ok": True, **body}), file=out)
    elif isinstance(text, str):
        print(text, file=out)
    else:
        for tenant in text:
            attributes = json.dumps(_masked(tenant.attributes), sort_keys=True)
            print(f"{tenant.id}\t{tenant.status.value}\t{attributes}", file=out)


def _report_error(args: argparse.Namespace, out: TextIO, exc: Exception, status: int) -> int:
    code = getattr(exc, "code", "usage")
    message = getattr(exc, "message", str(exc))
    hint = getattr(exc, "hint", None)
    if args.json:
        print(json.dumps({"ok": False, "code": code, "message": message, "hint": hint}), file=out)
    else:
        # One line, the hint after a semicolon: a log or a CI summary keeps it whole.
        print(f"error ({code}): {message}" + (f"; hint: {hint}" if hint else ""), file=sys.stderr)
    return status


def _add_migrate_group(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="run Alembic migrations for the shared schema and the tenants",
        description="Migrate every tenant (--all) or one to the Alembic head, one transaction "
        "each; tenants already at head are skipped. Exit status 1 if any tenant failed.",
    )
    add_app_option(migrate)
    which = migrate.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every registered tenant")
    which.add_argument("tenant", nargs="?", metavar="TENANT", help="one tenant's id")
    which.add_argument(
        "--print-env-template", action="store_true", help="print the env.py to copy and exit"
    )
    migrate.add_argument(
        "--config", default="alembic.ini", help="the Alembic ini file (default: alembic.ini)"
    )
    migrate.add_argument(
        "--dry-run",
        action="store_true",
        help="report what would run and what would fail (exit 1 if any would); change nothing",
    )
    migrate.add_argument(
        "--canary", type=_positive, default=0, metavar="N", help="migrate N first, stop on failure"
    )
    migrate.add_argument(
        "--concurrency",
        type=_positive,
        default=None,
        metavar="N",
        help="tenants migrated at once (default: the admin engine's pool size)",
    )
    migrate.add_argument(
        "--lock-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail a tenant whose tables stay locked longer (default: wait)",
    )
    migrate.add_argument(
        "--adopt",
        action="store_true",
        help="stamp tenants without a version table at head (tables made from metadata)",
    )
    migrate.add_argument("--json", action="store_true", help="print the report as JSON")
    migrate.set_defaults(handler=_migrate)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a positive integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return number


def _migrate(args: argparse.Namespace, out: TextIO) -> int:
    if args.print_env_template:
        from .sqlalchemy.migrations import env_template

        out.write(env_template())
        return EXIT_OK
    return asyncio.run(_migrate_async(args, out))


async def _migrate_async(args: argparse.Namespace, out: TextIO) -> int:
    from .operations.commands import run_migrate
    from .operations.progress import progress_for

    provisioner = load_provisioner(args.app)
    progress = progress_for(sys.stderr if args.json else out, json_output=args.json)
    report = await run_migrate(
        provisioner,
        args.config,
        tenants=None if args.all else [args.tenant],
        concurrency=args.concurrency,
        canary=args.canary,
        dry_run=args.dry_run,
        observer=progress,
        lock_timeout=args.lock_timeout,
        adopt=args.adopt,
    )
    progress.close(report)
    if args.json:
        print(report.to_json(), file=out)
    return EXIT_OK if report.ok else EXIT_REFUSED


def _add_audit_group(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit",
        help="report every way tenant isolation would not hold (exit 1 on any finding)",
        description="Read the live catalog and report isolation findings, each with its fix. "
        "Exit 0 when clean, 1 on any finding, 2 on a usage or connection error.",
    )
    audit.add_argument(
        "url", nargs="?", metavar="DATABASE_URL", help="catalog-only audit of this database"
    )
    add_app_option(audit)
    audit.add_argument(
        "--app-role",
        metavar="ROLE",
        help="the role the application connects as (default: the URL's own role)",
    )
    audit.add_argument(
        "--strategy",
        choices=CATALOG_STRATEGIES,
        default=None,
        help="how the catalog-only audit reads the database: row-level security (default), "
        "a schema per tenant, or a database per tenant",
    )
    audit.add_argument(
        "--tenant-column",
        default="tenant_id",
        metavar="COLUMN",
        help="row: a table with this column is a tenant table (default: tenant_id)",
    )
    audit.add_argument(
        "--shared",
        action="append",
        default=[],
        metavar="TABLE",
        help="row: a table shared by every tenant, not judged as a tenant table; repeatable",
    )
    audit.add_argument(
        "--schema",
        action="append",
        metavar="SCHEMA",
        help="inspect only this schema's tables (repeatable; default: every schema)",
    )
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    audit.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace, out: TextIO) -> int:
    from .operations.commands import run_audit

    provisioner = load_provisioner(args.app) if args.app else None
    report = asyncio.run(
        run_audit(
            url=args.url,
            provisioner=provisioner,
            app_role=args.app_role,
            strategy=args.strategy,
            tenant_column=args.tenant_column,
            shared_tables=args.shared,
            schemas=args.schema,
        )
    )
    print(json.dumps(report.as_dict()) if args.json else report.render(), file=out)
    return EXIT_OK if report.ok else EXIT_REFUSED


def _add_policy_group(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser(
        "policy",
        help="print (or apply) the row-level security DDL of the app's tenant tables",
        description="Print the RowLevelSecurity DDL of the application, or apply it in one "
        "transaction as the admin role with --apply.",
    )
    add_app_option(policy)
    policy.add_argument("--apply", action="store_true", help="run it, in one transaction")
    policy.add_argument("--json", action="store_true", help="print one JSON object")
    policy.set_defaults(handler=_policy)


def _policy(args: argparse.Namespace, out: TextIO) -> int:
    from .operations.commands import run_policy

    plan = asyncio.run(run_policy(load_provisioner(args.app), apply=args.apply))
    print(json.dumps(plan.as_dict()) if args.json else plan.render(), file=out)
    return EXIT_OK


_GROUPS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_sql_group,
    _add_tenants_group,
    _add_migrate_group,
    _add_audit_group,
    _add_policy_group,
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser: argparse.ArgumentParser = _Parser(
        prog="asgi-tenancy", description="Tools for asgi-tenancy applications."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"asgi-tenancy {__version__}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_group in _GROUPS:
        add_group(commands)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 refused, 2 usage or connection).

    The one boundary: a ``TenancyError`` a command did not answer itself, or anything else it
    raised (a driver error, a module ``--app`` names failing to import), becomes one line on
    stderr and exit 2; a driver's message is never shown (it may carry the URL).
    """
    from .errors import TenancyError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args, out or sys.stdout)
    except TenancyError as exc:
        return _report_error(args, out or sys.stdout, exc, EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return _report_error(args, out or sys.stdout, _failure(exc), EXIT_USAGE)


def _failure(exc: Exception) -> Exception:
    """A connection failure as ``DatabaseUnavailable`` (its type, never the driver's text,
    which names the host); anything else by its description, credentials removed."""
    from .errors import DatabaseUnavailable
    from .sqlalchemy.failures import describe, translate

    translated = translate(exc)
    if isinstance(exc, OSError) or isinstance(translated, DatabaseUnavailable):
        return DatabaseUnavailable(
            f"the database cannot be reached ({type(exc).__name__})",
            hint="check the host, port, database name and credentials",
        )
    return translated if translated is not None else _Failure(describe(exc))


class _Failure(Exception):
    """What ``main`` reports for an error that is no ``TenancyError``: its description."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
