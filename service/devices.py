"""Service functions for devices: register, look up, list."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import Device
from service.errors import Conflict, NotFound
from service.schemas import DeviceCreate


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


def local_device(
    name: str, *, backend: str = "torch-cpu", threads: int = 1, batch_size: int = 1, dtype: str = "float32"
) -> DeviceCreate:
    """Describe this machine as a device: hardware from its CPU model, environment fingerprinted now.

    Raises:
        pydantic.ValidationError: The name or the backend settings are invalid.
        profiler.errors.InvalidDeviceSpec: The backend settings are invalid.
    """
    # Imported here: the profiler package pulls in torch, which the rest of the CLI does not need.
    from profiler.device import local_device_spec
    from profiler.environment import collect_environment

    spec = local_device_spec(backend=backend, threads=threads, batch_size=batch_size, dtype=dtype)
    environment = collect_environment(backend_settings={"threads": threads, "dtype": dtype})
    return DeviceCreate(
        name=name,
        hardware=spec.hardware,
        backend=spec.backend,
        threads=spec.threads,
        batch_size=spec.batch_size,
        dtype=spec.dtype,
        environment=environment.model_dump(mode="json"),
        is_local=True,
    )
