"""Device service functions and the device schema."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.devices import (
    create_device,
    describe_device,
    get_device,
    list_devices,
    local_device,
    resolve_device,
)
from service.errors import Conflict, NotFound
from service.schemas.devices import DeviceCreate


def test_create_get_and_list(session: Session) -> None:
    created = create_device(session, DeviceCreate(name="pi4", hardware="Cortex-A72", threads=4))
    create_device(session, DeviceCreate(name="laptop", hardware="i7-1165G7"))
    session.commit()
    assert get_device(session, "pi4").id == created.id
    assert [device.name for device in list_devices(session)] == ["laptop", "pi4"]
    read = describe_device(session, created)
    assert (read.threads, read.backend, read.dtype, read.is_local) == (4, "torch-cpu", "float32", False)
    assert read.status.phase == "registered" and read.predictor is None
    assert read.profiling.network.ok == 0
    assert resolve_device(session, created.id).name == "pi4"
    assert resolve_device(session, str(created.id)).name == "pi4"
    assert resolve_device(session, "pi4").id == created.id
    with pytest.raises(NotFound, match="no device with id 999"):
        resolve_device(session, 999)


def test_duplicate_names_and_missing_devices(session: Session) -> None:
    create_device(session, DeviceCreate(name="pi4", hardware="Cortex-A72"))
    session.commit()
    with pytest.raises(Conflict, match="'pi4' exists already"):
        create_device(session, DeviceCreate(name="pi4", hardware="other"))
    with pytest.raises(NotFound, match="no device named 'pi5'"):
        get_device(session, "pi5")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backend", "tpu-magic", "unknown backend"),
        ("dtype", "int3", "dtype"),
        ("threads", 0, "threads"),
        ("batch_size", 10**6, "batch_size"),
        ("name", "has space", "name"),
        ("name", "123", "all digits"),
    ],
)
def test_device_create_rejects_invalid_specs(field: str, value: object, message: str) -> None:
    values: dict[str, object] = {"name": "d", "hardware": "CPU", field: value}
    with pytest.raises(ValidationError, match=message):
        DeviceCreate.model_validate(values)


def test_local_device_fingerprints_this_machine() -> None:
    spec = local_device("here", threads=1)
    assert spec.is_local and spec.hardware
    assert {"cpu_model", "logical_cores", "os", "python", "packages"} <= set(spec.environment)
