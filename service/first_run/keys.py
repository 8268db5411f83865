"""The first admin key: created and shown once on a database without one, or taken from the settings.

A fresh database has no key, and every API route but the probes needs one, so `lpnet serve` creates an
admin key, prints it once on stdout with the curl lines to try, and stores only its hash. With
``LPNET_ADMIN_KEY`` set (docker-compose hands the same key to an agent container) that exact key is
made an active admin key instead, and never printed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TextIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.auth import create_api_key, hash_api_key, key_prefix
from service.config import Settings
from service.db.models import ApiKey, KeyScope
from service.errors import Conflict

logger = logging.getLogger(__name__)

FIRST_KEY_NAME = "first-run admin"
CONFIGURED_KEY_NAME = "LPNET_ADMIN_KEY"


@dataclass(frozen=True)
class AdminKeyCheck:
    """What the start-up check of admin keys found or did.

    Attributes:
        created_key: A key created now, to be shown this once; None otherwise.
        configured_prefix: Prefix of ``LPNET_ADMIN_KEY`` when it is set (the key itself is never shown).
        configured_revoked: ``LPNET_ADMIN_KEY`` was revoked earlier and stays revoked.
        active_admin_keys: Active admin keys after the check.
    """

    created_key: str | None
    configured_prefix: str | None
    configured_revoked: bool
    active_admin_keys: int


def active_admin_key_count(session: Session) -> int:
    """Admin keys that have not been revoked."""
    count = session.scalar(
        select(func.count())
        .select_from(ApiKey)
        .where(ApiKey.scope == KeyScope.ADMIN.value, ApiKey.revoked_at.is_(None))
    )
    return int(count or 0)


def ensure_configured_key(session: Session, key: str) -> tuple[str, bool]:
    """Make `key` a stored admin key unless it is already one (the caller commits).

    A revoked key stays revoked: revoking is a deliberate act that a restart must not undo.

    Returns:
        The key's prefix, and whether it is revoked.

    Raises:
        Conflict: The key is stored with another scope.
    """
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key))).one_or_none()
    if row is None:
        session.add(
            ApiKey(
                name=CONFIGURED_KEY_NAME,
                prefix=key_prefix(key),
                key_hash=hash_api_key(key),
                scope=KeyScope.ADMIN.value,
            )
        )
        session.flush()
        logger.info("stored LPNET_ADMIN_KEY (prefix %s) as an admin key", key_prefix(key))
        return key_prefix(key), False
    if row.scope != KeyScope.ADMIN.value:
        raise Conflict(
            f"LPNET_ADMIN_KEY is stored as a {row.scope} key (prefix {row.prefix}), not an admin key; "
            "set LPNET_ADMIN_KEY to another key (e.g. the output of `lpnet keys create --scope admin`)",
            {"prefix": row.prefix, "scope": row.scope},
        )
    return row.prefix, row.revoked_at is not None


def check_admin_keys(session: Session, settings: Settings) -> AdminKeyCheck:
    """Make ``LPNET_ADMIN_KEY`` an admin key, or create a first one when there is no active admin key.

    A key is only created when the first run is enabled and ``LPNET_ADMIN_KEY`` is unset. The caller
    commits.

    Raises:
        Conflict: ``LPNET_ADMIN_KEY`` is stored with another scope.
    """
    created: str | None = None
    prefix: str | None = None
    revoked = False
    if settings.admin_key is not None:
        prefix, revoked = ensure_configured_key(session, settings.admin_key.get_secret_value())
    elif settings.first_run.enabled and active_admin_key_count(session) == 0:
        _row, created = create_api_key(session, scope=KeyScope.ADMIN.value, name=FIRST_KEY_NAME)
    return AdminKeyCheck(
        created_key=created,
        configured_prefix=prefix,
        configured_revoked=revoked,
        active_admin_keys=active_admin_key_count(session),
    )


def client_host(host: str) -> str:
    """The address a client on this machine reaches a server listening on `host` at."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def try_it_lines(settings: Settings) -> list[str]:
    """Shell lines that try the service: device progress, a latency, and a verified plan at 70 %."""
    api = f"http://{client_host(settings.host)}:{settings.port}"
    device = settings.first_run.device_name
    size = settings.first_run.image_size
    auth = '-H "Authorization: Bearer $ADMIN"'
    body = "-H 'Content-Type: application/json'"

    def architecture(name: str) -> str:
        return json.dumps(
            {"device": device, "architecture": {"torchvision": name, "input_shape": [1, 3, size, size]}}
        )

    plan = json.dumps(
        {
            "device": device,
            "architecture": {"torchvision": "resnet18", "input_shape": [1, 3, size, size]},
            "budget_ms": "BUDGET",
            "options": {"verify": True},
        }
    ).replace('"BUDGET"', "'\"$BUDGET\"'")
    return [
        f"API={api}",
        "# progress of the local device (profiling -> fitting -> refining -> ready):",
        f"curl -s $API/v1/devices/{device} {auth}",
        "# latency of resnet50 (409 with the progress until the device is ready):",
        f"curl -s -X POST $API/v1/latency {auth} {body} -d '{architecture('resnet50')}'",
        "# a verified pruning plan for resnet18 at 70 % of its predicted latency, then its result:",
        f"BUDGET=$(curl -s -X POST $API/v1/latency {auth} {body} -d '{architecture('resnet18')}' "
        "| python3 -c 'import json,sys; print(round(0.7 * json.load(sys.stdin)[\"total_ms\"], 3))')",
        f"curl -s -X POST $API/v1/plans {auth} {body} -d '{plan}'",
        f"curl -s $API/v1/plans/JOB_ID {auth}   # JOB_ID: the job_id of the answer above",
    ]


def print_admin_key_report(check: AdminKeyCheck, settings: Settings, out: TextIO, notes: TextIO) -> None:
    """Show a created key once, framed, with lines to try it (on `out`); anything else goes to `notes`."""
    if check.created_key is not None:
        rule = "=" * 78
        lines = [
            rule,
            "lpnet: first run. An admin API key was created. It is shown only this once (only its hash",
            "is stored); keep it somewhere safe:",
            "",
            f"    ADMIN={check.created_key}",
            "",
            f"This machine is being profiled as device {settings.first_run.device_name!r}; its first",
            "predictor follows. Try (in another terminal, after the ADMIN= line above):",
            "",
            *("    " + line for line in try_it_lines(settings)),
            rule,
        ]
        print("\n".join(lines), file=out, flush=True)
        return
    if check.configured_prefix is not None:
        if check.configured_revoked:
            logger.error(
                "LPNET_ADMIN_KEY (prefix %s) was revoked and stays revoked; set it to an active admin key",
                check.configured_prefix,
            )
        else:
            print(f"admin key from LPNET_ADMIN_KEY (prefix {check.configured_prefix}) is active", file=notes)
        return
    if check.active_admin_keys:
        print(
            f"{check.active_admin_keys} active admin key(s) exist (shown only when created); "
            "create another with `lpnet keys create --scope admin`",
            file=notes,
        )
    else:
        print("no active admin key: create one with `lpnet keys create --scope admin`", file=notes)
