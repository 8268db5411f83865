"""Shared database fixtures: a fresh SQLite file, a fresh PostgreSQL database, or either; empty or
migrated to the newest schema.

PostgreSQL comes from the server on 127.0.0.1:5432 (trust authentication). Each test gets its own
database, created through the `test` database and dropped afterwards. Migrated databases are copies
of one database (or SQLite file) migrated once per test run, so a test does not pay for the
migrations; the migrations themselves are tested from empty databases (tests/service/test_migrations.py). When the server cannot be
reached the test is skipped, or fails when ``CI=true``. Override the admin URL with
``LPNET_TEST_POSTGRES_ADMIN_URL``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from service.db.migrate import upgrade
from service.testing.postgres import POSTGRES_ADMIN_URL, PostgresUnreachable, scratch_database


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh (not yet created) SQLite file in the test's temporary directory."""
    return f"sqlite:///{(tmp_path / 'lpnet-test.db').as_posix()}"


@pytest.fixture(scope="session")
def sqlite_migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the newest schema once per run; tests get copies of it."""
    path = tmp_path_factory.mktemp("migrated-template") / "template.db"
    upgrade(f"sqlite:///{path.as_posix()}", "head")
    return path


@pytest.fixture
def sqlite_migrated_url(tmp_path: Path, sqlite_migrated_template: Path) -> str:
    """A fresh SQLite file migrated to the newest schema (a copy of the run's template)."""
    path = tmp_path / "lpnet-test.db"
    shutil.copyfile(sqlite_migrated_template, path)
    return f"sqlite:///{path.as_posix()}"


@contextmanager
def fresh_postgres_database(template: str | None = None) -> Iterator[str]:
    """A fresh PostgreSQL database (`service.testing.postgres.scratch_database`), dropped afterwards.

    Empty, or a copy of the database named `template`. Skips the test when the server cannot be
    reached, or fails it when ``CI=true``.
    """
    try:
        with scratch_database(POSTGRES_ADMIN_URL, template) as url:
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
def postgres_migrated_template() -> Iterator[str]:
    """Name of a PostgreSQL database migrated to the newest schema once per run; never connected to
    after the migration, so it can be copied."""
    with fresh_postgres_database() as url:
        upgrade(url, "head")
        yield make_url(url).database or ""


@pytest.fixture
def postgres_migrated_url(postgres_migrated_template: str) -> Iterator[str]:
    """URL of a fresh PostgreSQL database migrated to the newest schema (a copy of the run's template)."""
    with fresh_postgres_database(template=postgres_migrated_template) as url:
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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_url(request: pytest.FixtureRequest) -> str:
    """A fresh database migrated to the newest schema, on each backend in turn."""
    fixture = "sqlite_migrated_url" if request.param == "sqlite" else "postgres_migrated_url"
    url: str = request.getfixturevalue(fixture)
    return url
