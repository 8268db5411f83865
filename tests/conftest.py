"""Shared database fixtures: a fresh SQLite file, a fresh PostgreSQL database, or either.

PostgreSQL comes from the server on 127.0.0.1:5432 (trust authentication). Each test gets its own
database, created through the `test` database and dropped afterwards. When the server cannot be
reached the test is skipped, or fails when ``CI=true``. Override the admin URL with
``LPNET_TEST_POSTGRES_ADMIN_URL``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

POSTGRES_ADMIN_URL = os.environ.get(
    "LPNET_TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_unreachable(reason: str) -> None:
    message = f"PostgreSQL at {make_url(POSTGRES_ADMIN_URL).render_as_string()} is unreachable: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh (not yet created) SQLite file in the test's temporary directory."""
    return f"sqlite:///{(tmp_path / 'lpnet-test.db').as_posix()}"


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create a uniquely named, empty PostgreSQL database; yield its URL; drop it afterwards."""
    admin_url = make_url(POSTGRES_ADMIN_URL)
    # CREATE/DROP DATABASE cannot run inside a transaction, hence autocommit.
    admin = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args={"connect_timeout": 3}
    )
    name = f"lpnet_test_{uuid.uuid4().hex[:16]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        _postgres_unreachable(str(exc.orig).strip().splitlines()[0])
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            # FORCE ends connections a test left open (e.g. a pool not disposed after a failure).
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_session_url() -> Iterator[str]:
    """URL of one PostgreSQL database shared by the whole test run.

    Creating and dropping a database costs about a second on PostgreSQL 15, so tests that only need
    a schema share this one and must leave nothing behind: run them inside a transaction that is
    rolled back.
    """
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database on each backend in turn (the PostgreSQL case is marked ``postgres``)."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url
