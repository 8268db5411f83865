"""Shared database fixtures: a fresh SQLite file, a fresh PostgreSQL database, or either.

PostgreSQL comes from the server on 127.0.0.1:5432 (trust authentication). Each test gets its own
database, created through the `test` database and dropped afterwards. When the server cannot be
reached the test is skipped, or fails when ``CI=true``. Override the admin URL with
``LPNET_TEST_POSTGRES_ADMIN_URL``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.testing.postgres import POSTGRES_ADMIN_URL, PostgresUnreachable, scratch_database


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh (not yet created) SQLite file in the test's temporary directory."""
    return f"sqlite:///{(tmp_path / 'lpnet-test.db').as_posix()}"


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (`service.testing.postgres.scratch_database`), dropped afterwards.

    Skips the test when the server cannot be reached, or fails it when ``CI=true``.
    """
    try:
        with scratch_database(POSTGRES_ADMIN_URL) as url:
            yield url
    except PostgresUnreachable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


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
