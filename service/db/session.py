"""Engines and sessions for SQLite (embedded, one machine) and PostgreSQL (several machines)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from service.errors import DatabaseUnavailable, InvalidInput

# How long SQLite waits for another writer (server, worker, CLI) before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 5000
# How long PostgreSQL connection attempts may take; without it an unreachable host hangs /readyz.
POSTGRES_CONNECT_TIMEOUT_S = 5


def parse_database_url(url: str | URL) -> URL:
    """Parse a database URL, defaulting PostgreSQL URLs to the psycopg (v3) driver.

    Raises:
        InvalidInput: The URL cannot be parsed or names a backend other than SQLite or PostgreSQL.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InvalidInput(
            f"database URL {str(url)!r} is not a valid SQLAlchemy URL; expected e.g. "
            "'sqlite:///path/to/lpnet.db' or 'postgresql+psycopg://user@host:5432/lpnet'"
        ) from exc
    if parsed.drivername in ("postgres", "postgresql"):
        # psycopg 3 is the driver lpnet ships with; be explicit so a bare URL never asks for psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise InvalidInput(
            f"unsupported database backend {backend!r} in the database URL; use sqlite or postgresql"
        )
    return parsed


def is_sqlite(url: str | URL) -> bool:
    """Whether the URL points at an SQLite database."""
    return parse_database_url(url).get_backend_name() == "sqlite"


def _is_sqlite_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or str(url.database).startswith("file::memory:")


def make_engine(url: str | URL, *, echo: bool = False, sqlite_foreign_keys: bool = True) -> Engine:
    """Create an engine configured for the backend of `url`.

    SQLite gets foreign keys enforced, the WAL journal (readers do not block the writer) and a busy
    timeout, and its parent directory is created. PostgreSQL gets ``pool_pre_ping`` so connections
    dropped by a server restart are replaced instead of failing a request.

    Args:
        url: SQLAlchemy database URL.
        echo: Log every SQL statement.
        sqlite_foreign_keys: Enforce foreign keys on SQLite. Migrations turn this off because SQLite
            batch operations recreate tables, and dropping a referenced table with enforcement on
            would cascade-delete the rows that point at it.
    """
    parsed = parse_database_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _make_sqlite_engine(parsed, echo=echo, foreign_keys=sqlite_foreign_keys)
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return create_engine(parsed, echo=echo, pool_pre_ping=True, connect_args=connect_args)


def _make_sqlite_engine(url: URL, *, echo: bool, foreign_keys: bool) -> Engine:
    memory = _is_sqlite_memory(url)
    if memory:
        # One shared connection, or every new connection would see a new, empty database.
        engine = create_engine(
            url, echo=echo, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        Path(str(url.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # FastAPI runs sync routes in a thread pool, so a pooled connection moves between threads.
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory bound to `engine`.

    Objects stay readable after commit (``expire_on_commit=False``) so a route or command can return
    what it just stored without another round trip.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Open a session that commits when the block succeeds and rolls back when it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def describe_database_error(exc: BaseException) -> str:
    """One line saying why a database operation failed, without the SQL or the driver's stack."""
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(original).__name__


def check_database(engine: Engine) -> None:
    """Run ``SELECT 1`` on the database.

    Raises:
        DatabaseUnavailable: The database could not be reached or did not answer.
    """
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(
            f"database is unreachable: {describe_database_error(exc)}",
            {"backend": engine.dialect.name},
        ) from exc
