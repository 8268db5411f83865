"""Constraints and column behaviour that the rest of the service relies on, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from service.db.models import (
    ApiKey,
    Device,
    Job,
    LayerMeasurement,
    NetworkMeasurement,
    ProfileBatch,
    ProfileRun,
    RunSource,
)
from service.db.session import make_engine


def add_device(session: Session, name: str = "cpu-1t") -> Device:
    device = Device(name=name, hardware="test CPU", backend="torch-cpu", threads=1, batch_size=1)
    session.add(device)
    session.flush()
    return device


def add_run(session: Session, device: Device) -> ProfileRun:
    run = ProfileRun(device=device, source=RunSource.LOCAL)
    session.add(run)
    session.flush()
    return run


def layer_row(device: Device, run: ProfileRun, sample_key: str, **overrides: Any) -> LayerMeasurement:
    values: dict[str, Any] = {
        "device_id": device.id,
        "run_id": run.id,
        "sample_key": sample_key,
        "context": "isolated",
        "layer_config": {"op": "conv2d", "in_channels": 64, "out_channels": 64},
        "median_ms": 1.0,
        "p10_ms": 0.9,
        "p90_ms": 1.2,
        "cv": 0.04,
        "repetitions": 30,
    }
    values.update(overrides)
    return LayerMeasurement(**values)


def network_row(device: Device, run: ProfileRun, sample_key: str) -> NetworkMeasurement:
    return NetworkMeasurement(
        device_id=device.id,
        run_id=run.id,
        sample_key=sample_key,
        architecture={"layers": []},
        arch_hash="ab" * 32,
        median_ms=10.0,
        repetitions=30,
    )


def test_layer_sample_key_is_unique_per_device(session: Session) -> None:
    first, second = add_device(session, "a"), add_device(session, "b")
    run_a, run_b = add_run(session, first), add_run(session, second)
    session.add_all([layer_row(first, run_a, "conv-64-64"), layer_row(second, run_b, "conv-64-64")])
    session.commit()

    session.add(layer_row(first, run_a, "conv-64-64"))
    with pytest.raises(IntegrityError, match="(?i)unique"):
        session.commit()


def test_network_sample_key_is_unique_per_device(session: Session) -> None:
    device = add_device(session)
    run = add_run(session, device)
    session.add(network_row(device, run, "resnet18"))
    session.commit()

    session.add(network_row(device, run, "resnet18"))
    with pytest.raises(IntegrityError, match="(?i)unique"):
        session.commit()


def test_idempotency_key_is_unique_per_device(session: Session) -> None:
    first, second = add_device(session, "a"), add_device(session, "b")
    run_a, run_b = add_run(session, first), add_run(session, second)
    for device, run in ((first, run_a), (second, run_b)):
        session.add(
            ProfileBatch(device_id=device.id, idempotency_key="k1", run_id=run.id, row_count=3, response={})
        )
    session.commit()

    session.add(
        ProfileBatch(device_id=first.id, idempotency_key="k1", run_id=run_a.id, row_count=1, response={})
    )
    with pytest.raises(IntegrityError, match="(?i)unique"):
        session.commit()


def test_api_key_scope_must_be_known(session: Session) -> None:
    session.add(ApiKey(name="x", prefix="lpn_abcdefgh", key_hash="0" * 64, scope="root"))
    with pytest.raises(IntegrityError, match="ck_api_key_scope_valid"):
        session.commit()


def test_agent_key_needs_a_device(session: Session) -> None:
    session.add(ApiKey(name="x", prefix="lpn_abcdefgh", key_hash="1" * 64, scope="agent"))
    with pytest.raises(IntegrityError, match="ck_api_key_agent_has_device"):
        session.commit()


def test_key_hash_is_unique(session: Session) -> None:
    session.add(ApiKey(name="x", prefix="lpn_abcdefgh", key_hash="2" * 64, scope="reader"))
    session.commit()
    session.add(ApiKey(name="y", prefix="lpn_abcdefgh", key_hash="2" * 64, scope="admin"))
    with pytest.raises(IntegrityError, match="(?i)unique"):
        session.commit()


def test_successful_measurement_needs_a_latency(session: Session) -> None:
    device = add_device(session)
    run = add_run(session, device)
    failed = layer_row(
        device, run, "oom", status="failed", median_ms=None, p10_ms=None, p90_ms=None, cv=None, error="OOM"
    )
    session.add(failed)
    session.commit()

    session.add(layer_row(device, run, "missing", median_ms=None))
    with pytest.raises(IntegrityError, match="ck_layer_measurement_ok_has_latency"):
        session.commit()


def test_unknown_status_is_rejected(session: Session) -> None:
    device = add_device(session)
    session.add(Job(kind="fit", device_id=device.id, status="paused"))
    with pytest.raises(IntegrityError, match="ck_job_status_valid"):
        session.commit()


def test_foreign_keys_are_enforced(session: Session) -> None:
    session.add(ProfileRun(device_id=12345, source="local"))
    with pytest.raises(IntegrityError, match="(?i)foreign key"):
        session.commit()


def test_deleting_a_device_deletes_its_measurements_but_keeps_its_jobs(session: Session) -> None:
    device = add_device(session)
    run = add_run(session, device)
    session.add(layer_row(device, run, "conv"))
    session.add(Job(kind="fit", device_id=device.id))
    session.commit()

    session.delete(device)
    session.commit()
    session.expire_all()
    assert session.scalars(select(LayerMeasurement)).all() == []
    assert session.scalars(select(ProfileRun)).all() == []
    job = session.scalars(select(Job)).one()
    assert job.device_id is None


def test_timestamps_are_timezone_aware_utc(session: Session) -> None:
    device = add_device(session)
    session.commit()
    session.expire_all()
    reloaded = session.get(Device, device.id)
    assert reloaded is not None
    assert reloaded.created_at.tzinfo is not None
    assert reloaded.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - reloaded.created_at) < timedelta(minutes=5)


def test_timestamps_in_other_zones_are_stored_as_utc(session: Session) -> None:
    device = add_device(session)
    run = add_run(session, device)
    plus_two = timezone(timedelta(hours=2))
    run.finished_at = datetime(2025, 1, 1, 14, 0, tzinfo=plus_two)
    session.commit()
    session.expire_all()
    reloaded = session.get(ProfileRun, run.id)
    assert reloaded is not None
    assert reloaded.finished_at == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert reloaded.finished_at is not None and reloaded.finished_at.utcoffset() == timedelta(0)


def test_naive_timestamps_are_refused(session: Session) -> None:
    device = add_device(session)
    run = add_run(session, device)
    run.finished_at = datetime(2025, 1, 1, 12, 0)
    with pytest.raises(StatementError, match="naive datetime"):
        session.commit()


def test_json_none_is_stored_as_sql_null(session: Session) -> None:
    idle = add_device(session, "idle")
    busy = add_device(session, "busy")
    busy.status = {"phase": "profiling", "percent": 40, "eta": "3m"}
    session.commit()
    session.expire_all()
    names = session.scalars(select(Device.name).where(Device.status.is_(None))).all()
    assert names == [idle.name]
    reloaded = session.get(Device, busy.id)
    assert reloaded is not None and reloaded.status == {"phase": "profiling", "percent": 40, "eta": "3m"}


def test_job_defaults(session: Session) -> None:
    job = Job(kind="plan")
    session.add(job)
    session.commit()
    session.expire_all()
    reloaded = session.get(Job, job.id)
    assert reloaded is not None
    assert (reloaded.status, reloaded.attempts, reloaded.max_attempts) == ("queued", 0, 3)
    assert reloaded.updated_at >= reloaded.created_at


def test_sqlite_connections_get_foreign_keys_wal_and_busy_timeout(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
            assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert connection.execute(text("PRAGMA busy_timeout")).scalar_one() == 5000
    finally:
        engine.dispose()
