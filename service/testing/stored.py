"""What the failure scenarios write straight into the database and read back from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select

from profiler.batch import Measurement, MeasurementKind
from service.db.models import Job, NetworkMeasurement
from service.db.models import ProfileBatch as StoredBatch
from service.db.session import make_engine, make_session_factory
from service.predictors import FittedPredictor, store_predictor


def replicate_rows(source: Sequence[Measurement], count: int, prefix: str) -> list[Measurement]:
    """`count` whole-network measurements copied from `source` under distinct sample keys."""
    networks = [m for m in source if m.kind is MeasurementKind.NETWORK and m.status == "ok"]
    if not networks:
        raise ValueError("no successful whole-network measurement to copy")
    return [
        networks[i % len(networks)].model_copy(update={"sample_key": f"{prefix}-{i:06d}"})
        for i in range(count)
    ]


def count_stored(database_url: str, device_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Per device: stored batches, network rows and distinct sample keys."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            counts: dict[int, dict[str, int]] = {}
            for device_id in device_ids:
                rows = select(NetworkMeasurement).where(NetworkMeasurement.device_id == device_id).subquery()
                counts[device_id] = {
                    "batches": int(
                        session.scalar(
                            select(func.count())
                            .select_from(StoredBatch)
                            .where(StoredBatch.device_id == device_id)
                        )
                        or 0
                    ),
                    "rows": int(session.scalar(select(func.count()).select_from(rows)) or 0),
                    "distinct_rows": int(
                        session.scalar(select(func.count(func.distinct(rows.c.sample_key)))) or 0
                    ),
                }
            return counts
    finally:
        engine.dispose()


def stored_keys(database_url: str, device_id: int) -> tuple[set[str], set[str]]:
    """The device's stored batch idempotency keys and network sample keys."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            batches = set(
                session.scalars(select(StoredBatch.idempotency_key).where(StoredBatch.device_id == device_id))
            )
            rows = set(
                session.scalars(
                    select(NetworkMeasurement.sample_key).where(NetworkMeasurement.device_id == device_id)
                )
            )
            return batches, rows
    finally:
        engine.dispose()


def read_job(database_url: str, job_id: int) -> dict[str, Any]:
    """A job's status, attempts, lease owner, progress, result and error as stored now."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise RuntimeError(f"job {job_id} is gone")
            return {
                "status": str(job.status),
                "attempts": job.attempts,
                "lease_owner": job.lease_owner,
                "progress": job.progress,
                "result": job.result,
                "error": job.error,
            }
    finally:
        engine.dispose()


def store_device_predictor(database_url: str, device_id: int, fitted: FittedPredictor) -> int:
    """Store a fitted predictor for the device (as a finished fit job would); returns its id."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            predictor = store_predictor(session, device_id, fitted)
            session.commit()
            return predictor.id
    finally:
        engine.dispose()
