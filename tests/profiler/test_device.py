from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from profiler.device import DeviceSpec, local_device_spec
from profiler.errors import InvalidDeviceSpec


def test_valid_spec_round_trips_and_has_a_stable_key() -> None:
    spec = DeviceSpec(hardware="AMD EPYC", backend="onnxruntime-cpu", threads=2, batch_size=4)
    assert DeviceSpec(**spec.to_dict()) == spec
    assert spec.key == DeviceSpec(**spec.to_dict()).key
    assert spec.key != DeviceSpec(hardware="AMD EPYC", backend="onnxruntime-cpu", threads=1, batch_size=4).key


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"backend": "tvm"}, "valid choices: onnxruntime-cpu, torch-cpu, torch-cuda"),
        ({"threads": 0}, "threads=0 must be an integer in 1..1024"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"threads": True}, "threads=True"),
        ({"dtype": "int8"}, "valid choices: float32, float16, bfloat16"),
        ({"hardware": ""}, "hardware"),
    ],
)
def test_invalid_fields_are_named(fields: dict[str, object], fragment: str) -> None:
    values: dict[str, object] = {"hardware": "cpu", **fields}
    with pytest.raises(InvalidDeviceSpec, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        DeviceSpec(**values)  # type: ignore[arg-type]


def test_spec_inside_a_json_document_fails_as_a_validation_error() -> None:
    class Holder(BaseModel):
        device: DeviceSpec

    assert Holder.model_validate_json('{"device": {"hardware": "x", "threads": 3}}').device.threads == 3
    with pytest.raises(ValidationError, match="threads=0"):
        Holder.model_validate_json('{"device": {"hardware": "x", "threads": 0}}')


def test_thread_range_of_this_machine_is_checked_when_the_backend_is_built() -> None:
    spec = DeviceSpec(hardware="x", threads=1000)  # valid for some other machine
    with pytest.raises(InvalidDeviceSpec, match="valid range"):
        spec.create_backend()


def test_local_spec_names_this_cpu() -> None:
    spec = local_device_spec()
    assert spec.hardware
    assert spec.backend == "torch-cpu"
