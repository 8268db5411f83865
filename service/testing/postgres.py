"""PostgreSQL for tests and benchmarks: a scratch database per use, and the local cluster itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from service.db.session import make_engine

# The server scratch databases are created on (trust authentication); its `test` database is only
# connected to, to create and drop the others.
POSTGRES_ADMIN_URL = os.environ.get(
    "LPNET_TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


class PostgresUnreachable(RuntimeError):
    """The PostgreSQL server that scratch databases are made on does not answer."""


@contextmanager
def scratch_database(admin_url: str = POSTGRES_ADMIN_URL, template: str | None = None) -> Iterator[str]:
    """Create a uniquely named PostgreSQL database; yield its URL; drop it afterwards.

    The database is empty, or a copy of the database named `template` (which nothing may be
    connected to while it is copied).

    Raises:
        PostgresUnreachable: The server at `admin_url` cannot be reached.
    """
    admin = make_url(admin_url)
    # CREATE/DROP DATABASE cannot run inside a transaction, hence autocommit.
    engine = create_engine(
        admin, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args={"connect_timeout": 3}
    )
    name = f"lpnet_test_{uuid.uuid4().hex[:16]}"
    try:
        with engine.connect() as connection:
            copy_of = f' TEMPLATE "{template}"' if template is not None else ""
            connection.execute(text(f'CREATE DATABASE "{name}"{copy_of}'))
    except OperationalError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0]
        raise PostgresUnreachable(
            f"PostgreSQL at {admin.render_as_string()} is unreachable: {reason}"
        ) from exc
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            # FORCE ends connections left open (e.g. a pool not disposed after a failure).
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@dataclass(frozen=True)
class PostgresCluster:
    """The local Debian-style PostgreSQL cluster, driven with ``pg_ctlcluster``."""

    version: str
    name: str = "main"

    @classmethod
    def find(cls) -> PostgresCluster | None:
        """The one cluster under /etc/postgresql, or None without pg_ctlcluster (or with no or several versions)."""
        if shutil.which("pg_ctlcluster") is None:
            return None
        config = Path("/etc/postgresql")
        versions = sorted(p.name for p in config.iterdir() if p.is_dir()) if config.is_dir() else []
        if len(versions) != 1 or not (config / versions[0] / "main").is_dir():
            return None
        return cls(versions[0])

    def ctl(self, action: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", *options, self.version, self.name, action],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def is_running(self) -> bool:
        # pg_ctlcluster status: 0 running, 3 not running.
        return self.ctl("status").returncode == 0

    def restart(self) -> None:
        """Restart with the fast shutdown mode (open connections are closed, not waited for)."""
        result = self.ctl("restart", "--mode", "fast")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctlcluster restart failed ({result.returncode}): {result.stderr.strip()}")

    def ensure_running(self) -> None:
        """Start the cluster unless it runs (a failed restart must not leave it down)."""
        if not self.is_running():
            self.ctl("start")


def postmaster_started(database_url: str) -> datetime:
    """When the server behind `database_url` was last started."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            started: datetime = connection.execute(text("SELECT pg_postmaster_start_time()")).scalar_one()
            return started
    finally:
        engine.dispose()
