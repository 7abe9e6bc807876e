"""The ``asgi-tenancy`` command line: one subcommand group per concern.

- ``sql check``: the guarded query for one tenant, or why it is refused;
- ``tenants list|show|create|suspend|activate|drop``: the application's ``TenantProvisioner``;
- ``migrate (--all|TENANT)``: Alembic across the shared schema and every tenant;
- ``audit``: the isolation audit of a live database; ``policy``: print or apply the RLS DDL.

Groups register themselves in ``_GROUPS``; each imports its own dependencies lazily. Commands
that act on an application's tenants load its ``TenantProvisioner`` from
``--app module:attribute`` (or ``TENANCY_APP``); the attribute may also be a zero-argument
callable returning one, so building engines can wait until the command runs. ``--json`` prints
one JSON object everywhere; exit codes: 0 ok, 1 refused or findings, 2 usage or connection.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .sqlalchemy.provisioning import TenantProvisioner
    from .tenant import Tenant

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, TextIO], int]
APP_ENV_VAR = "TENANCY_APP"


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
    from .errors import IsolationConfigError
    from .sqlalchemy.provisioning import TenantProvisioner

    if not spec:
        raise IsolationConfigError(
            "no application given", hint=f"pass --app module:attribute or set {APP_ENV_VAR}"
        )
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise IsolationConfigError(
            "--app must look like module:attribute", hint="e.g. --app myapp.tenancy:provisioner"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like python -m: the working directory's modules
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        raise IsolationConfigError(
            f"--app {spec} cannot be imported", hint="check the module path and attribute name"
        ) from None
    if callable(target) and not isinstance(target, TenantProvisioner):
        target = target()
    if not isinstance(target, TenantProvisioner):
        raise IsolationConfigError(
            f"{spec} is not a TenantProvisioner", hint="point --app at a TenantProvisioner"
        )
    return target


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
        "--shared-table", action="append", default=[], metavar="NAME", help="repeatable"
    )
    check.add_argument("--tenant-column", default="tenant_id")
    check.add_argument("--schema", default="public", help="allowed schema ('' for none)")
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


def _tenants(args: argparse.Namespace, out: TextIO) -> int:
    import asyncio

    from .errors import TenancyError

    try:
        provisioner = load_provisioner(args.app)
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
    return asyncio.run(_run_tenants(provisioner, args, out))


async def _run_tenants(
    provisioner: TenantProvisioner, args: argparse.Namespace, out: TextIO
) -> int:
    from .errors import ConfirmationRequired, InvalidTenantIdentifier, TenancyError, TenantNotFound

    try:
        if args.action == "list":
            tenants = await provisioner.list_tenants()
            _print(args, out, {"tenants": [_tenant_json(t) for t in tenants]}, tenants)
            return EXIT_OK
        tenant: Tenant | None
        if args.action == "show":
            tenant = await provisioner.get(args.tenant_id)
            if tenant is None:
                raise TenantNotFound()
        elif args.action == "create":
            tenant = await provisioner.create_tenant(args.tenant_id, dict(args.attr))
        elif args.action == "suspend":
            tenant = await provisioner.suspend(args.tenant_id)
        elif args.action == "activate":
            tenant = await provisioner.activate(args.tenant_id)
        else:
            try:
                await provisioner.drop_tenant(args.tenant_id, confirm=args.yes)
            except ConfirmationRequired as exc:
                raise ConfirmationRequired(exc.message, hint="pass --yes") from None
            _print(args, out, {"dropped": args.tenant_id}, f"dropped {args.tenant_id}")
            return EXIT_OK
        _print(args, out, {"tenant": _tenant_json(tenant)}, [tenant])
        return EXIT_OK
    except InvalidTenantIdentifier as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_REFUSED)
    finally:
        await provisioner.strategy.dispose()
        await provisioner.dispose()


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
        print(f"error ({code}): {message}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
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
    migrate.add_argument("--config", default="alembic.ini", help="the Alembic ini file")
    migrate.add_argument("--dry-run", action="store_true", help="report, change nothing")
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
    from .errors import TenancyError

    if args.print_env_template:
        from .sqlalchemy.migrations import env_template

        out.write(env_template())
        return EXIT_OK
    import asyncio

    from .sqlalchemy.migrations import describe_error

    try:
        return asyncio.run(_migrate_async(args, out))
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
    except Exception as exc:  # the registry unreachable, a broken script directory...
        # One line without credentials, not a traceback that may print a DSN.
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_USAGE


async def _migrate_async(args: argparse.Namespace, out: TextIO) -> int:
    from ._progress import progress_for
    from .sqlalchemy.migrations import migrate_tenants

    provisioner = load_provisioner(args.app)
    try:
        progress = progress_for(sys.stderr if args.json else out, json_output=args.json)
        report = await migrate_tenants(
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
    finally:
        await provisioner.admin_engine.dispose()
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
    audit.add_argument("--app-role", help="the role the application connects as")
    audit.add_argument("--tenant-column", default="tenant_id")
    audit.add_argument("--shared", action="append", default=[], metavar="TABLE", help="repeatable")
    audit.add_argument(
        "--schema",
        action="append",
        metavar="SCHEMA",
        help="inspect only this schema's tables (repeatable; default: every schema)",
    )
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    audit.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace, out: TextIO) -> int:
    import asyncio

    from .errors import TenancyError
    from .sqlalchemy.commands import run_audit

    try:
        provisioner = load_provisioner(args.app) if args.app else None
        report = asyncio.run(
            run_audit(
                url=args.url,
                provisioner=provisioner,
                app_role=args.app_role,
                tenant_column=args.tenant_column,
                shared_tables=args.shared,
                schemas=args.schema,
            )
        )
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
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
    import asyncio

    from .errors import TenancyError
    from .sqlalchemy.commands import run_policy

    try:
        plan = asyncio.run(run_policy(load_provisioner(args.app), apply=args.apply))
    except TenancyError as exc:
        return _report_error(args, out, exc, EXIT_USAGE)
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
    parser = argparse.ArgumentParser(
        prog="asgi-tenancy", description="Tools for asgi-tenancy applications."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_group in _GROUPS:
        add_group(commands)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 refused, 2 usage)."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args, out or sys.stdout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
