"""`lpnet db`: migrate the database schema."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from service.commands._common import CommandError, display_url, info
from service.config import Settings
from service.db import migrate

if TYPE_CHECKING:
    from service.commands._common import SubParsers


def register(subparsers: SubParsers) -> None:
    """Add the ``db`` command group."""
    parser = subparsers.add_parser(
        "db",
        help="migrate the database schema",
        description="Migrate the database named by LPNET_DATABASE_URL (default: SQLite in LPNET_DATA_DIR).",
    )
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)

    upgrade = actions.add_parser("upgrade", help="migrate up (to the newest schema by default)")
    upgrade.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    upgrade.set_defaults(handler=run_upgrade)

    downgrade = actions.add_parser("downgrade", help="migrate down to a revision ('base' removes all)")
    downgrade.add_argument("revision", help="target revision, e.g. 0001 or base")
    downgrade.set_defaults(handler=run_downgrade)

    current = actions.add_parser("current", help="show the revision the database is at")
    current.set_defaults(handler=run_current)


def _describe(revision: str | None) -> str:
    if revision is None:
        return "base (no schema)"
    return f"{revision} (head)" if revision == migrate.head() else revision


def run_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate the database up to ``args.revision``."""
    url = settings.database_url
    before = migrate.current(url)
    migrate.upgrade(url, args.revision)
    after = migrate.current(url)
    where = display_url(url)
    if before == after:
        print(f"{where} is already at {_describe(after)}")
    else:
        print(f"{where} upgraded from {_describe(before)} to {_describe(after)}")
    return 0


def run_downgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate the database down to ``args.revision``."""
    if args.revision == "head":
        raise CommandError("`db downgrade head` does nothing; name an older revision or 'base'", 2)
    url = settings.database_url
    before = migrate.current(url)
    migrate.downgrade(url, args.revision)
    after = migrate.current(url)
    print(f"{display_url(url)} downgraded from {_describe(before)} to {_describe(after)}")
    return 0


def run_current(_args: argparse.Namespace, settings: Settings) -> int:
    """Print the revision the database is at."""
    at = migrate.current(settings.database_url)
    print(_describe(at))
    if at != migrate.head():
        info(f"the newest schema is {migrate.head()}; run `lpnet db upgrade`")
    return 0
