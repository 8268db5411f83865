"""Migrations run up, down and up again on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError

from service.db import migrate, models
from service.db.base import Base
from service.db.session import make_engine
from service.errors import InvalidInput, SchemaOutOfDate

MODEL_TABLES = {
    "device",
    "profile_run",
    "profile_batch",
    "layer_measurement",
    "network_measurement",
    "predictor",
    "job",
    "api_key",
    "model_upload",
    "agent_task",
    "latency_plot",
}


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_declare_exactly_the_expected_tables() -> None:
    assert models.Base is Base
    assert set(Base.metadata.tables) == MODEL_TABLES


def test_upgrade_downgrade_upgrade_round_trip(db_url: str) -> None:
    assert migrate.current(db_url) is None

    migrate.upgrade(db_url)
    assert table_names(db_url) == MODEL_TABLES | {"alembic_version"}
    assert migrate.current(db_url) == migrate.head()

    migrate.downgrade(db_url, "base")
    assert table_names(db_url) <= {"alembic_version"}
    assert migrate.current(db_url) is None

    migrate.upgrade(db_url, "head")
    assert table_names(db_url) == MODEL_TABLES | {"alembic_version"}
    assert migrate.current(db_url) == migrate.head()


def test_models_match_the_migrated_schema(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_every_constraint_and_index_is_named() -> None:
    for table in Base.metadata.sorted_tables:
        for constraint in table.constraints:
            assert constraint.name, f"unnamed {type(constraint).__name__} on {table.name}"
        for index in table.indexes:
            assert index.name, f"unnamed index on {table.name}"


def test_migrations_run_from_any_working_directory(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    migrate.upgrade(sqlite_url)
    assert migrate.current(sqlite_url) == migrate.head()


def test_unknown_revision_is_reported_with_the_known_ones(sqlite_url: str) -> None:
    with pytest.raises(InvalidInput, match=r"'nope'.*known revisions: 0001"):
        migrate.upgrade(sqlite_url, "nope")


def test_revisions_are_listed_oldest_first() -> None:
    revisions = migrate.revision_ids()
    assert revisions[0] == "0001"
    assert revisions[-1] == migrate.head()


def test_ensure_schema_upgrades_sqlite_automatically(sqlite_url: str) -> None:
    assert migrate.ensure_schema(sqlite_url) == "base"
    assert migrate.current(sqlite_url) == migrate.head()
    assert migrate.ensure_schema(sqlite_url) is None


@pytest.mark.postgres
def test_ensure_schema_only_checks_postgres(postgres_url: str) -> None:
    with pytest.raises(SchemaOutOfDate, match="run `lpnet db upgrade`"):
        migrate.ensure_schema(postgres_url)
    assert migrate.current(postgres_url) is None

    migrate.upgrade(postgres_url)
    assert migrate.ensure_schema(postgres_url) is None


def test_a_schema_from_a_newer_lpnet_is_reported(sqlite_url: str) -> None:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaOutOfDate, match="newer lpnet"):
        migrate.require_current_schema(sqlite_url)
    with pytest.raises(SchemaOutOfDate, match="newer lpnet"):
        migrate.ensure_schema(sqlite_url)


def table_columns(url: str, table: str) -> set[str]:
    engine = make_engine(url)
    try:
        return {column["name"] for column in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def insert_device(connection: Connection) -> None:
    connection.execute(
        text(
            "INSERT INTO device (id, name, hardware, backend, threads, batch_size, dtype, environment, "
            "is_local, created_at) VALUES (1, 'd', 'cpu', 'torch-cpu', 1, 1, 'float32', '{}', false, "
            "CURRENT_TIMESTAMP)"
        )
    )


def test_revision_0002_adds_and_removes_the_plot_column_keeping_rows(db_url: str) -> None:
    migrate.upgrade(db_url, "0001")
    assert "plot_png" not in table_columns(db_url, "predictor")
    engine = make_engine(db_url)
    with engine.begin() as connection:
        insert_device(connection)
        connection.execute(
            text(
                "INSERT INTO predictor (id, device_id, kind, version, artifact, feature_schema_version, metrics, "
                "training_fingerprint, created_at) VALUES (1, 1, 'lpnet', 1, :artifact, 1, '{}', 'f', "
                "CURRENT_TIMESTAMP)"
            ),
            {"artifact": b"tensors"},
        )
    migrate.upgrade(db_url, "0002")
    assert "plot_png" in table_columns(db_url, "predictor")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT artifact, plot_png FROM predictor")).one() == (
            b"tensors",
            None,
        )
    migrate.downgrade(db_url, "0001")
    assert "plot_png" not in table_columns(db_url, "predictor")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT artifact FROM predictor")).scalar_one() == b"tensors"
    engine.dispose()


def test_revision_0005_adds_and_removes_the_body_hash_keeping_batches(db_url: str) -> None:
    migrate.upgrade(db_url, "0004")
    assert "body_sha256" not in table_columns(db_url, "profile_batch")
    engine = make_engine(db_url)
    with engine.begin() as connection:
        insert_device(connection)
        connection.execute(
            text(
                "INSERT INTO profile_run (id, device_id, source, status, protocol, environment, started_at) "
                "VALUES (1, 1, 'agent', 'completed', '{}', '{}', CURRENT_TIMESTAMP)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO profile_batch (id, device_id, idempotency_key, run_id, row_count, response, "
                "created_at) VALUES (1, 1, 'batch-old-0001', 1, 3, '{\"batch_id\": 1}', CURRENT_TIMESTAMP)"
            )
        )
    migrate.upgrade(db_url, "0005")
    assert "body_sha256" in table_columns(db_url, "profile_batch")
    with engine.begin() as connection:
        # A batch stored before the revision has no hash: its key replays any body.
        assert connection.execute(text("SELECT idempotency_key, body_sha256 FROM profile_batch")).one() == (
            "batch-old-0001",
            None,
        )
        connection.execute(text("UPDATE profile_batch SET body_sha256 = :digest"), {"digest": "a" * 64})
    migrate.downgrade(db_url, "0004")
    assert "body_sha256" not in table_columns(db_url, "profile_batch")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT idempotency_key, row_count FROM profile_batch")).one() == (
            "batch-old-0001",
            3,
        )
    engine.dispose()


def test_revision_0006_adds_the_job_owner_deadline_and_not_before_keeping_rows(db_url: str) -> None:
    new_columns = {"key_id", "deadline_at", "not_before"}
    migrate.upgrade(db_url, "0005")
    assert not new_columns & table_columns(db_url, "job")
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO job (id, kind, status, input, attempts, max_attempts, created_at, updated_at) "
                "VALUES (1, 'fit', 'queued', '{}', 0, 3, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
    migrate.upgrade(db_url, "0006")
    assert new_columns <= table_columns(db_url, "job")
    with engine.begin() as connection:
        assert connection.execute(text("SELECT kind, key_id, deadline_at, not_before FROM job")).one() == (
            "fit",
            None,
            None,
            None,
        )
        connection.execute(
            text(
                "INSERT INTO api_key (id, name, prefix, key_hash, scope, created_at) "
                "VALUES (7, 'r', 'lpn_r', :hash, 'reader', CURRENT_TIMESTAMP)"
            ),
            {"hash": "0" * 64},
        )
        connection.execute(text("UPDATE job SET key_id = 7"))
    with engine.begin() as connection:  # the engine enforces foreign keys on SQLite too
        connection.execute(text("DELETE FROM api_key WHERE id = 7"))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT key_id FROM job")).scalar_one() is None  # ON DELETE SET NULL
    migrate.downgrade(db_url, "0005")
    assert not new_columns & table_columns(db_url, "job")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT kind FROM job")).scalar_one() == "fit"
    engine.dispose()


def test_revision_0007_gives_existing_devices_retain_and_checks_the_policy(db_url: str) -> None:
    migrate.upgrade(db_url, "0006")
    assert "allocator" not in table_columns(db_url, "device")
    engine = make_engine(db_url)
    with engine.begin() as connection:
        insert_device(connection)
    migrate.upgrade(db_url, "0007")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name, allocator FROM device")).one() == ("d", "retain")
    # The new check holds, and so do the table's older ones (SQLite rebuilt the table to add it).
    for change, constraint in (
        ("allocator = 'jemalloc'", "ck_device_allocator_valid"),
        ("threads = 0", "ck_device_threads_positive"),
    ):
        with pytest.raises(IntegrityError, match=constraint), engine.begin() as connection:
            connection.execute(text(f"UPDATE device SET {change}"))
    with engine.begin() as connection:
        connection.execute(text("UPDATE device SET allocator = 'system'"))
    migrate.downgrade(db_url, "0006")
    assert "allocator" not in table_columns(db_url, "device")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name, threads FROM device")).one() == ("d", 1)
    engine.dispose()
