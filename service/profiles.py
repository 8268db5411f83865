"""Storing measurements: profile batches posted by device agents, and the rows both paths write.

A batch is stored in one transaction together with its `profile_batch` row, whose unique
(device, idempotency key) makes a retried POST a replay: it stores nothing and answers the response
the first POST got. The row keeps the sha256 of the batch's canonical JSON, so the same key with
another body is refused (409) rather than answered with a response that does not describe it. Rows
whose sample key the device already has are skipped, so overlapping batches (an agent resending after
a crash) do not duplicate measurements either.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from profiler.batch import NETWORK_KINDS, Measurement, MeasurementKind
from profiler.batch import ProfileBatch as ProfileBatchSchema
from profiler.environment import ALLOCATOR_ENVIRONMENT, AllocatorPolicy, Environment
from service.db.base import utcnow
from service.db.models import (
    Device,
    LayerMeasurement,
    MeasurementContext,
    MeasurementStatus,
    NetworkMeasurement,
    ProfileBatch,
    ProfileRun,
    RunSource,
    RunStatus,
)
from service.errors import Conflict, IdempotencyKeyReused, InvalidInput
from service.schemas.profiles import ProfileSubmissionRead, RowCounts

logger = logging.getLogger(__name__)

# Settings that change latency: measurements taken with other values belong to another device.
DEVICE_SPEC_FIELDS = ("backend", "threads", "batch_size", "dtype")
# Concurrent batches with overlapping sample keys can collide on insert; one retry re-reads the keys.
INSERT_ATTEMPTS = 3


class AllocatorMismatch(InvalidInput):
    """Measurements taken under another allocator policy than the device's."""

    code = "allocator_mismatch"


@dataclass(frozen=True)
class SubmissionOutcome:
    """The answer to a batch, and whether it was a replay of an earlier one."""

    response: dict[str, Any]
    replayed: bool


def in_network_sample_key(sample_key: str, layer_name: str) -> str:
    """Key of one layer's time inside an in_context measurement (distinct from any profiler key)."""
    digest = hashlib.sha256(layer_name.encode("utf-8")).hexdigest()[:16]
    return f"{sample_key}@{digest}"


def measurement_rows(
    measurement: Measurement, device_id: int, run_id: int
) -> list[NetworkMeasurement | LayerMeasurement]:
    """The rows one measurement is stored as.

    A network or in_context measurement is one `network_measurement` row; an in_context one also
    gives one `layer_measurement` row (context in_network) per layer it timed. An isolated
    measurement is one `layer_measurement` row.
    """
    ok = measurement.status == MeasurementStatus.OK
    stats = {
        "median_ms": measurement.median_ms if ok else None,
        "p10_ms": measurement.p10_ms if ok else None,
        "p90_ms": measurement.p90_ms if ok else None,
        "cv": measurement.cv if ok else None,
        "repetitions": measurement.repetitions or 0,
        "status": measurement.status,
        "error": measurement.error,
    }
    if measurement.kind is MeasurementKind.ISOLATED:
        assert measurement.layer is not None  # the schema guarantees it
        return [
            LayerMeasurement(
                device_id=device_id,
                run_id=run_id,
                sample_key=measurement.sample_key,
                context=MeasurementContext.ISOLATED,
                layer_config=measurement.layer.model_dump(mode="json"),
                layer_name=measurement.layer.name,
                **stats,
            )
        ]
    network = measurement.architecture
    assert network is not None  # the schema guarantees it
    per_layer = [t.model_dump(mode="json") for t in measurement.per_layer] if measurement.per_layer else None
    rows: list[NetworkMeasurement | LayerMeasurement] = [
        NetworkMeasurement(
            device_id=device_id,
            run_id=run_id,
            sample_key=measurement.sample_key,
            architecture=network.model_dump(mode="json"),
            arch_hash=network.content_hash,
            family=measurement.family,
            width_vector=list(measurement.width_vector) if measurement.width_vector is not None else None,
            per_layer=per_layer,
            residual_ms=measurement.residual_ms if ok else None,
            probe_ms=measurement.probe_ms,
            relative_latency=measurement.relative_latency,
            probe_version=measurement.probe_version,
            **stats,
        )
    ]
    if ok and measurement.kind is MeasurementKind.IN_CONTEXT and measurement.per_layer:
        layers = network.by_name
        for timing in measurement.per_layer:
            layer = layers.get(timing.layer)
            if layer is None:
                logger.warning(
                    "%s: per-layer time of %r, which is not a layer of its network; not stored as a layer row",
                    measurement.sample_key,
                    timing.layer,
                )
                continue
            rows.append(
                LayerMeasurement(
                    device_id=device_id,
                    run_id=run_id,
                    sample_key=in_network_sample_key(measurement.sample_key, timing.layer),
                    context=MeasurementContext.IN_NETWORK,
                    layer_config=layer.model_dump(mode="json"),
                    layer_name=layer.name,
                    network_hash=network.content_hash,
                    median_ms=timing.ms,
                    repetitions=measurement.repetitions or 0,
                    status=MeasurementStatus.OK,
                )
            )
    return rows


def batch_body_sha256(batch: ProfileBatchSchema) -> str:
    """sha256 of the batch's canonical JSON: the fields the client sent, keys sorted, no whitespace.

    Formatting, key order and the spelling of equal values (``1`` or ``1.0``, time zone notations) do
    not change it; fields left out stay out, so defaults filled in now (a missing ``measured_at``) do
    not make a retry of the same body look different.
    """
    canonical = json.dumps(
        batch.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def existing_sample_keys(session: Session, device_id: int, keys: Iterable[str] | None = None) -> set[str]:
    """Sample keys the device already has (among `keys`, or all of them), failed ones included."""
    found: set[str] = set()
    wanted = None if keys is None else list(keys)
    for table in (NetworkMeasurement, LayerMeasurement):
        query = select(table.sample_key).where(table.device_id == device_id)
        if wanted is None:
            found.update(session.scalars(query))
            continue
        # Chunks keep the IN list under SQLite's bound-parameter limit.
        for start in range(0, len(wanted), 500):
            found.update(session.scalars(query.where(table.sample_key.in_(wanted[start : start + 500]))))
    return found


def _stored_batch(session: Session, device_id: int, key: str) -> ProfileBatch | None:
    return session.scalars(
        select(ProfileBatch).where(ProfileBatch.device_id == device_id, ProfileBatch.idempotency_key == key)
    ).one_or_none()


def _replay(stored: ProfileBatch, body_sha256: str) -> SubmissionOutcome:
    """The first answer under the stored batch's key, if this body is the one stored under it.

    A batch stored without a hash (before hashes were kept) replays whatever body comes.

    Raises:
        IdempotencyKeyReused: The key was used for another body.
    """
    if stored.body_sha256 is not None and stored.body_sha256 != body_sha256:
        raise IdempotencyKeyReused(
            f"idempotency key {stored.idempotency_key!r} was used on {stored.created_at.isoformat()} for "
            f"another batch (batch {stored.id}); nothing was stored: send these measurements under a new key",
            {"idempotency_key": stored.idempotency_key, "batch_id": stored.id},
        )
    return SubmissionOutcome(dict(stored.response), replayed=True)


def _check_device_spec(device: Device, batch: ProfileBatchSchema) -> list[str]:
    mismatched = {
        name: {"registered": getattr(device, name), "batch": getattr(batch.device, name)}
        for name in DEVICE_SPEC_FIELDS
        if getattr(device, name) != getattr(batch.device, name)
    }
    if mismatched:
        described = ", ".join(
            f"{name} {values['batch']!r} (registered: {values['registered']!r})"
            for name, values in mismatched.items()
        )
        raise InvalidInput(
            f"the batch was measured with {described}; device {device.name!r} is registered with other "
            "settings, so these measurements belong to another device: register one for them",
            {"mismatched": mismatched},
        )
    if batch.device.hardware != device.hardware:
        return [
            f"the batch names hardware {batch.device.hardware!r}; device {device.name!r} is registered "
            f"as {device.hardware!r}"
        ]
    return []


def check_allocator(device: Device, environment: Environment) -> None:
    """Refuse measurements whose environment says they ran under another allocator policy than the device's.

    Raises:
        AllocatorMismatch: Naming the device's policy, the measured one and how to measure under the former.
    """
    measured = environment.allocator_policy
    registered = AllocatorPolicy(device.allocator)
    if measured == registered:
        return
    retain = ALLOCATOR_ENVIRONMENT[AllocatorPolicy.RETAIN]
    recipe = " ".join(f"{name}={value}" for name, value in retain.items())
    how = (
        f"measure with --allocator retain, or start the measuring process with {recipe}"
        if registered == AllocatorPolicy.RETAIN
        else f"measure with --allocator system in a fresh process started without {', '.join(retain)}"
    )
    raise AllocatorMismatch(
        f"device {device.name!r} is registered with allocator policy {registered.value!r}, but these "
        f"measurements ran under {measured.value!r} (environment.allocator_retains_memory is "
        f"{str(environment.allocator_retains_memory).lower()}); nothing was stored: {how} "
        "(lpnet agent follows its device's policy by itself)",
        {"allocator": {"registered": registered.value, "measured": measured.value}},
    )


def _agent_run(session: Session, device: Device, batch: ProfileBatchSchema) -> ProfileRun:
    """The device's latest agent run if it had the same environment and protocol, else a new one."""
    protocol = batch.protocol.model_dump(mode="json")
    environment = batch.environment.model_dump(mode="json")
    latest = session.scalars(
        select(ProfileRun)
        .where(ProfileRun.device_id == device.id, ProfileRun.source == RunSource.AGENT)
        .order_by(ProfileRun.id.desc())
        .limit(1)
    ).first()
    if latest is not None and latest.protocol == protocol and latest.environment == environment:
        return latest
    run = ProfileRun(
        device_id=device.id,
        source=RunSource.AGENT,
        status=RunStatus.COMPLETED,
        protocol=protocol,
        environment=environment,
        summary={"batches": 0, "rows": 0},
    )
    session.add(run)
    session.flush()
    return run


def submit_profile_batch(
    session: Session, device: Device, batch: ProfileBatchSchema, header_key: str | None = None
) -> SubmissionOutcome:
    """Store a batch of measurements for `device`, once per idempotency key; commits.

    The same key with the same body (see `batch_body_sha256`) is a replay: nothing is stored and the
    first answer comes back.

    Args:
        session: A session with no pending changes; it is committed (or rolled back) here.
        device: The device the batch is for.
        batch: The validated batch.
        header_key: The ``Idempotency-Key`` header, if sent; it must equal the body's key.

    Raises:
        InvalidInput: The header and body keys differ, or the batch was measured with other device
            settings.
        AllocatorMismatch: The batch was measured under another allocator policy than the device's.
        IdempotencyKeyReused: The key was used for another body before.
        Conflict: Concurrent batches kept colliding on the same sample keys.
    """
    if header_key is not None and header_key != batch.idempotency_key:
        raise InvalidInput(
            f"the Idempotency-Key header {header_key!r} differs from the batch's idempotency_key "
            f"{batch.idempotency_key!r}; send the same key in both (or only in the body)"
        )
    device_id = device.id
    body_sha256 = batch_body_sha256(batch)
    for attempt in range(INSERT_ATTEMPTS):
        stored = _stored_batch(session, device_id, batch.idempotency_key)
        if stored is not None:
            return _replay(stored, body_sha256)
        warnings = _check_device_spec(device, batch)
        check_allocator(device, batch.environment)
        try:
            response = _insert_batch(session, device, batch, body_sha256, warnings)
            session.commit()
        except IntegrityError:
            # Another request stored this key (replay it) or some of these sample keys (re-read them).
            session.rollback()
            logger.info(
                "batch %s collided with a concurrent insert (attempt %d)", batch.idempotency_key, attempt + 1
            )
            continue
        return SubmissionOutcome(response, replayed=False)
    stored = _stored_batch(session, device_id, batch.idempotency_key)
    if stored is not None:
        return _replay(stored, body_sha256)
    raise Conflict(
        f"batch {batch.idempotency_key} kept colliding with concurrent submissions of the same samples; "
        "retry it",
        {"idempotency_key": batch.idempotency_key},
    )


def _insert_batch(
    session: Session, device: Device, batch: ProfileBatchSchema, body_sha256: str, warnings: Sequence[str]
) -> dict[str, Any]:
    measurements = batch.measurements
    existing = existing_sample_keys(session, device.id, [m.sample_key for m in measurements])
    run = _agent_run(session, device, batch)
    stored = {"network": 0, "layer": 0}
    skipped = {"network": 0, "layer": 0}
    failed_rows = 0
    in_network_layers = 0
    for measurement in measurements:
        table = "network" if measurement.kind in NETWORK_KINDS else "layer"
        if measurement.sample_key in existing:
            skipped[table] += 1
            continue
        rows = measurement_rows(measurement, device.id, run.id)
        session.add_all(rows)
        stored[table] += 1
        in_network_layers += len(rows) - 1 if table == "network" else 0
        failed_rows += measurement.status != MeasurementStatus.OK
    run.finished_at = utcnow()
    summary = dict(run.summary or {})
    summary["batches"] = int(summary.get("batches", 0)) + 1
    summary["rows"] = int(summary.get("rows", 0)) + stored["network"] + stored["layer"]
    run.summary = summary
    record = ProfileBatch(
        device_id=device.id,
        idempotency_key=batch.idempotency_key,
        run_id=run.id,
        row_count=stored["network"] + stored["layer"],
        response={},
        body_sha256=body_sha256,
    )
    session.add(record)
    session.flush()
    response = ProfileSubmissionRead(
        batch_id=record.id,
        device_id=device.id,
        run_id=run.id,
        idempotency_key=batch.idempotency_key,
        received=RowCounts(network=len(batch.network_measurements), layer=len(batch.layer_measurements)),
        stored=RowCounts(**stored),
        skipped=RowCounts(**skipped),
        failed_rows=failed_rows,
        in_network_layers=in_network_layers,
        warnings=list(warnings),
    ).model_dump(mode="json")
    record.response = response
    session.flush()
    return response
