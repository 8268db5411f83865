"""Run the Alembic migrations from code, from any working directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL

import service
from service.db.session import is_sqlite, make_engine, parse_database_url
from service.errors import InvalidInput, SchemaOutOfDate

# The package is installed editable, so alembic.ini and migrations/ sit next to it in the repository.
REPO_ROOT = Path(service.__file__).resolve().parents[1]
ALEMBIC_INI = REPO_ROOT / "alembic.ini"
MIGRATIONS_DIR = REPO_ROOT / "migrations"


def alembic_config(url: str | URL) -> Config:
    """Return an Alembic config for the repository's migrations, targeting `url`.

    Raises:
        FileNotFoundError: alembic.ini or migrations/ are missing (the package is not an editable
            install of the repository).
    """
    for required in (ALEMBIC_INI, MIGRATIONS_DIR):
        if not required.exists():
            raise FileNotFoundError(
                f"{required} not found; database migrations need lpnet installed from its repository "
                "(pip install -e .)"
            )
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute rather than an ini option: ini values treat '%' (common in passwords) as
    # interpolation.
    config.attributes["url"] = parse_database_url(url).render_as_string(hide_password=False)
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`.

    Raises:
        InvalidInput: `revision` does not name a known revision.
    """
    _run(command.upgrade, url, revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at `url` down to `revision` (``base`` removes every table).

    Raises:
        InvalidInput: `revision` does not name a known revision.
    """
    _run(command.downgrade, url, revision)


def _run(operation: Callable[[Config, str], None], url: str | URL, revision: str) -> None:
    config = alembic_config(url)
    try:
        operation(config, revision)
    except CommandError as exc:
        known = ", ".join(revision_ids()) or "(none)"
        raise InvalidInput(
            f"cannot migrate to revision {revision!r}: {exc}; known revisions: {known}, head, base"
        ) from exc


def current(url: str | URL) -> str | None:
    """Return the revision the database at `url` is at, or None if it has never been migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """Return the newest revision of the migration scripts."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    revision = script.get_current_head()
    if revision is None:
        raise FileNotFoundError(f"no migration revisions found in {MIGRATIONS_DIR / 'versions'}")
    return revision


def revision_ids() -> list[str]:
    """Return every revision id, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def require_current_schema(url: str | URL) -> None:
    """Check that the database at `url` is migrated to the head revision.

    Raises:
        SchemaOutOfDate: The database is at another revision, or was never migrated.
    """
    at = current(url)
    expected = head()
    if at is not None and at not in revision_ids():
        raise SchemaOutOfDate(
            f"the database is at revision {at}, which this version of lpnet does not know; "
            "it was probably migrated by a newer lpnet, so upgrade lpnet",
            {"current": at, "head": expected},
        )
    if at != expected:
        state = "has no lpnet schema" if at is None else f"is at revision {at}"
        raise SchemaOutOfDate(
            f"the database {state} but this version of lpnet needs revision {expected}; "
            "run `lpnet db upgrade` first",
            {"current": at, "head": expected},
        )


def ensure_schema(url: str | URL) -> str | None:
    """Make sure the database at `url` can be used by this version of lpnet.

    An embedded SQLite database is migrated to head automatically. A PostgreSQL database is shared by
    several processes, so it is only checked; upgrading it is an explicit ``lpnet db upgrade``.

    Returns:
        The revision an SQLite database was upgraded from ("base" if it was empty), or None if nothing
        had to change.

    Raises:
        SchemaOutOfDate: A PostgreSQL database is not at head, or a database is at a revision this
            version of lpnet does not know.
    """
    at = current(url)
    if at == head():
        return None
    if not is_sqlite(url) or (at is not None and at not in revision_ids()):
        require_current_schema(url)  # raises, saying what to do
    upgrade(url, "head")
    return at or "base"
