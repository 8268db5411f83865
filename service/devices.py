"""Service functions for devices: register, look up, list, describe, and report progress."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from profiler.environment import AllocatorPolicy, collect_environment
from service.auth import create_api_key, key_prefix
from service.db.base import utcnow
from service.db.models import (
    Device,
    KeyScope,
    LayerMeasurement,
    MeasurementStatus,
    NetworkMeasurement,
    Predictor,
)
from service.errors import Conflict, NotFound
from service.pagination import Keyset, Page, PageRequest, paginate
from service.schemas.common import MAX_ID, reads_as_id
from service.schemas.devices import (
    DeviceCreate,
    DeviceCreated,
    DeviceRead,
    DeviceStatus,
    PredictorSummary,
    ProfilingCounts,
    StatusCounts,
)

logger = logging.getLogger(__name__)

# Phases in which a stored status describes work in progress; otherwise the status is derived from
# what the device has (measurements, a predictor).
ACTIVE_PHASES = frozenset({"profiling", "fitting", "refining"})


def create_device(session: Session, spec: DeviceCreate) -> Device:
    """Register a device (the caller commits).

    Raises:
        Conflict: A device with this name exists already.
    """
    if session.scalars(select(Device.id).where(Device.name == spec.name)).first() is not None:
        raise Conflict(f"a device named {spec.name!r} exists already; pick another name")
    device = Device(**spec.model_dump())
    session.add(device)
    try:
        # Flushed inside a savepoint so a concurrent insert of the same name surfaces as Conflict
        # without spoiling the caller's transaction.
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        raise Conflict(f"a device named {spec.name!r} exists already; pick another name") from exc
    return device


def get_device(session: Session, name: str) -> Device:
    """Return the device called `name`.

    Raises:
        NotFound: No device has this name.
    """
    device = session.scalars(select(Device).where(Device.name == name)).one_or_none()
    if device is None:
        raise NotFound(f"no device named {name!r}; see `lpnet device list` or add it with `lpnet device add`")
    return device


def list_devices(session: Session) -> list[Device]:
    """Return every device, by name."""
    return list(session.scalars(select(Device).order_by(Device.name)))


# Devices are listed by name, which is unique.
DEVICE_LIST = Keyset("devices", Device.name)


def page_devices(session: Session, page: PageRequest) -> Page[Device]:
    """A page of the devices, by name."""
    return paginate(session, select(Device), DEVICE_LIST, page)


def resolve_device(session: Session, ref: int | str) -> Device:
    """Return the device with id `ref` (an int or a string of digits) or else named `ref`.

    Device names are never all digits, so the two cannot be confused.

    Raises:
        NotFound: No such device.
    """
    if isinstance(ref, int) or reads_as_id(ref):
        device = session.get(Device, int(ref)) if 1 <= int(ref) <= MAX_ID else None
        if device is None:
            raise NotFound(f"no device with id {ref}; see GET /v1/devices", {"device": ref})
        return device
    try:
        return get_device(session, ref)
    except NotFound as exc:
        raise NotFound(f"no device named {ref!r}; see GET /v1/devices", {"device": ref}) from exc


def register_device(session: Session, spec: DeviceCreate) -> tuple[Device, str]:
    """Register a device and create the agent key it submits measurements with (the caller commits).

    Returns:
        The device and the raw agent key, which is stored only as a hash.
    """
    device = create_device(session, spec)
    _key, raw = create_api_key(session, scope=KeyScope.AGENT.value, device=device)
    return device, raw


def latest_predictors(session: Session, device_ids: Sequence[int]) -> dict[int, Predictor]:
    """The newest predictor version of each device that has one (artifacts are not loaded)."""
    if not device_ids:
        return {}
    newest = (
        select(Predictor.device_id, func.max(Predictor.version).label("version"))
        .where(Predictor.device_id.in_(device_ids))
        .group_by(Predictor.device_id)
        .subquery()
    )
    rows = session.scalars(
        select(Predictor).join(
            newest, (Predictor.device_id == newest.c.device_id) & (Predictor.version == newest.c.version)
        )
    )
    return {row.device_id: row for row in rows}


def latest_predictor(session: Session, device: Device) -> Predictor | None:
    """The newest predictor version of `device`, or None before the first fit."""
    # Every latency query asks this: one indexed lookup, not the grouped join of `latest_predictors`.
    return session.scalars(
        select(Predictor).where(Predictor.device_id == device.id).order_by(Predictor.version.desc()).limit(1)
    ).first()


def profiling_counts(session: Session, device_ids: Sequence[int]) -> dict[int, ProfilingCounts]:
    """Measurements per device by kind (network, isolated layer, layer in network) and status."""
    counts = {device_id: ProfilingCounts() for device_id in device_ids}
    if not device_ids:
        return counts
    last: dict[int, datetime] = {}
    network_rows = session.execute(
        select(
            NetworkMeasurement.device_id,
            NetworkMeasurement.status,
            func.count(),
            func.max(NetworkMeasurement.created_at),
        )
        .where(NetworkMeasurement.device_id.in_(device_ids))
        .group_by(NetworkMeasurement.device_id, NetworkMeasurement.status)
    )
    for device_id, status, count, newest in network_rows:
        _add(counts[device_id].network, status, count)
        _note_latest(last, device_id, newest)
    layer_rows = session.execute(
        select(
            LayerMeasurement.device_id,
            LayerMeasurement.context,
            LayerMeasurement.status,
            func.count(),
            func.max(LayerMeasurement.created_at),
        )
        .where(LayerMeasurement.device_id.in_(device_ids))
        .group_by(LayerMeasurement.device_id, LayerMeasurement.context, LayerMeasurement.status)
    )
    for device_id, context, status, count, newest in layer_rows:
        bucket = counts[device_id].isolated if context == "isolated" else counts[device_id].in_network
        _add(bucket, status, count)
        _note_latest(last, device_id, newest)
    for device_id, when in last.items():
        counts[device_id].last_measured_at = when
    return counts


def _add(bucket: StatusCounts, status: str, count: int) -> None:
    if status == MeasurementStatus.OK:
        bucket.ok += count
    else:
        bucket.failed += count


def _note_latest(last: dict[int, datetime], device_id: int, when: Any) -> None:
    if when is None:
        return
    if isinstance(when, str):  # SQLite returns max() of a timestamp column as text
        when = datetime.fromisoformat(when)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if device_id not in last or when > last[device_id]:
        last[device_id] = when


def device_status(device: Device, counts: ProfilingCounts, predictor: Predictor | None) -> DeviceStatus:
    """The stored status while work is in progress (or failed), else what the device has; with the
    version of the predictor in use, if any.

    A stored ``ready`` status adds what the first run's refining says (``refined``, a message) to a
    device that has a predictor.
    """
    stored = device.status or {}
    version = predictor.version if predictor is not None else None
    if stored.get("phase") in ACTIVE_PHASES or stored.get("phase") == "failed":
        try:
            status = DeviceStatus.model_validate({**stored, "predictor_version": version})
        except ValueError:
            logger.warning("device %s has an unreadable status %r; ignored", device.name, stored)
        else:
            if status.phase == "refining":
                status.refined = False
            return status
    if predictor is not None:
        ready = stored if stored.get("phase") == "ready" else {}
        return DeviceStatus(
            phase="ready",
            percent=100.0,
            message=ready.get("message") or f"predictor version {predictor.version}",
            job_id=ready.get("job_id"),
            predictor_version=version,
            refined=ready.get("refined"),
        )
    measured = counts.network.ok + counts.isolated.ok + counts.in_network.ok
    if measured:
        return DeviceStatus(
            phase="profiled",
            message=f"{counts.network.ok} network measurement(s); fit a predictor next",
        )
    return DeviceStatus(phase="registered", message="nothing measured yet; profile the device first")


def describe_devices(session: Session, devices: Sequence[Device]) -> list[DeviceRead]:
    """Each device with its profiling counts, newest predictor and status (three queries in all)."""
    ids = [device.id for device in devices]
    counts = profiling_counts(session, ids)
    predictors = latest_predictors(session, ids)
    described = []
    for device in devices:
        predictor = predictors.get(device.id)
        described.append(
            DeviceRead(
                id=device.id,
                name=device.name,
                hardware=device.hardware,
                backend=device.backend,
                threads=device.threads,
                batch_size=device.batch_size,
                dtype=device.dtype,
                allocator=AllocatorPolicy(device.allocator),
                environment=device.environment,
                is_local=device.is_local,
                created_at=device.created_at,
                status=device_status(device, counts[device.id], predictor),
                profiling=counts[device.id],
                predictor=PredictorSummary.model_validate(predictor) if predictor is not None else None,
            )
        )
    return described


def describe_device(session: Session, device: Device) -> DeviceRead:
    """One device with its profiling counts, newest predictor and status."""
    return describe_devices(session, [device])[0]


def describe_created_device(session: Session, device: Device, agent_key: str) -> DeviceCreated:
    """A just-registered device together with its agent key (shown once)."""
    read = describe_device(session, device)
    return DeviceCreated(**read.model_dump(), agent_key=agent_key, agent_key_prefix=key_prefix(agent_key))


def set_device_status(
    factory: sessionmaker[Session],
    device_id: int,
    phase: str | None,
    *,
    percent: float | None = None,
    eta_seconds: float | None = None,
    message: str | None = None,
    job_id: int | None = None,
    refined: bool | None = None,
) -> None:
    """Record a device's progress in its own short transaction; ``phase=None`` clears it.

    Progress is advisory: a failure to write it is logged, never raised into the work it reports on.
    """
    status: dict[str, Any] | None = None
    if phase is not None:
        status = DeviceStatus.model_validate(
            {
                "phase": phase,
                "percent": None if percent is None else round(min(100.0, max(0.0, percent)), 1),
                "eta_seconds": None if eta_seconds is None else round(max(0.0, eta_seconds), 1),
                "message": message,
                "job_id": job_id,
                "updated_at": utcnow(),
                "refined": refined,
            }
        ).model_dump(mode="json", exclude={"predictor_version"})  # derived when read
    try:
        with factory() as session:
            device = session.get(Device, device_id)
            if device is None:
                return
            device.status = status
            session.commit()
    except SQLAlchemyError as exc:
        logger.warning("could not record the status of device %d: %s", device_id, exc)


def local_device(
    name: str,
    *,
    backend: str = "torch-cpu",
    threads: int = 1,
    batch_size: int = 1,
    dtype: str = "float32",
    allocator: AllocatorPolicy = AllocatorPolicy.RETAIN,
) -> DeviceCreate:
    """Describe this machine as a device: hardware from its CPU model, environment fingerprinted now.

    Raises:
        pydantic.ValidationError: The name or the backend settings are invalid.
        profiler.errors.InvalidDeviceSpec: The backend settings are invalid.
    """
    # Imported here: the profiler package pulls in torch, which the rest of the CLI does not need.
    from profiler.device import local_device_spec

    spec = local_device_spec(backend=backend, threads=threads, batch_size=batch_size, dtype=dtype)
    environment = collect_environment(backend_settings={"threads": threads, "dtype": dtype})
    return DeviceCreate(
        name=name,
        hardware=spec.hardware,
        backend=spec.backend,
        threads=spec.threads,
        batch_size=spec.batch_size,
        dtype=spec.dtype,
        allocator=allocator,
        environment=environment.model_dump(mode="json"),
        is_local=True,
    )
