"""`lpnet keys`: create, list and revoke API keys."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from service.auth import create_api_key, list_api_keys, revoke_api_key
from service.commands._common import database_session, info, print_table
from service.config import Settings
from service.db.models import KeyScope
from service.devices import get_device

if TYPE_CHECKING:
    from service.commands._common import SubParsers


def register(subparsers: SubParsers) -> None:
    """Add the ``keys`` command group."""
    parser = subparsers.add_parser("keys", help="manage API keys", description="Manage API keys.")
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)

    create = actions.add_parser(
        "create",
        help="create a key and print it once",
        description=(
            "Create an API key and print it on stdout. Only its hash is stored: copy it now. "
            "admin may do everything, reader may read, agent may submit measurements for one device."
        ),
    )
    create.add_argument("--scope", required=True, choices=[scope.value for scope in KeyScope])
    create.add_argument("--device", metavar="NAME", help="the device an agent key submits for")
    create.add_argument("--name", help="a label to recognise the key by")
    create.set_defaults(handler=run_create)

    listing = actions.add_parser("list", help="list keys (prefixes only, never the keys)")
    listing.add_argument("--active", action="store_true", help="leave out revoked keys")
    listing.set_defaults(handler=run_list)

    revoke = actions.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("prefix", help="the prefix shown by `lpnet keys list` (lpn_ and 8 characters)")
    revoke.set_defaults(handler=run_revoke)


def run_create(args: argparse.Namespace, settings: Settings) -> int:
    """Create a key and print it (the only time it is shown)."""
    with database_session(settings) as session:
        device = get_device(session, args.device) if args.device else None
        row, key = create_api_key(session, scope=args.scope, name=args.name, device=device)
        prefix, name, scope = row.prefix, row.name, row.scope
    # The key alone on stdout, so `KEY=$(lpnet keys create ...)` works; the notes go to stderr.
    print(key)
    target = f" for device {args.device!r}" if args.device else ""
    info(f"created {scope} key {name!r} (prefix {prefix}){target}; it is not shown again, store it now")
    return 0


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print the keys: prefix, name, scope, device, dates, state."""
    with database_session(settings) as session:
        keys = list_api_keys(session, include_revoked=not args.active)
        rows = [
            (
                key.prefix,
                key.name,
                key.scope,
                key.device.name if key.device is not None else None,
                key.created_at.strftime("%Y-%m-%d %H:%M"),
                key.last_used_at.strftime("%Y-%m-%d %H:%M") if key.last_used_at else None,
                "active" if key.revoked_at is None else f"revoked {key.revoked_at:%Y-%m-%d}",
            )
            for key in keys
        ]
    if not rows:
        info("no API keys; create one with `lpnet keys create --scope admin`")
        return 0
    print_table(("PREFIX", "NAME", "SCOPE", "DEVICE", "CREATED (UTC)", "LAST USED", "STATE"), rows)
    return 0


def run_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke the key with the given prefix."""
    with database_session(settings) as session:
        key = revoke_api_key(session, args.prefix)
        prefix, name = key.prefix, key.name
    print(f"revoked key {prefix} ({name})")
    return 0
