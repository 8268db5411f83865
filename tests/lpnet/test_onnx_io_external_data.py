"""Tensors whose data lives in external files are refused wherever they are, without opening the file."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from onnx import ModelProto, TensorProto

from lpnet.arch.onnx_io import network_from_onnx
from lpnet.errors import (
    ExternalDataRefused,
    LpnetError,
)
from tests.lpnet.onnx_hostile import (
    EXTERNAL_DATA_MODELS,
    LOCATIONS,
    MARKER,
    SECRET_FLOAT,
    PlantedFiles,
    clip_model,
    external_tensor,
    opened_files,
    plant_secret_files,
)


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PlantedFiles:
    files = plant_secret_files(tmp_path)
    monkeypatch.chdir(files.work)
    return files


def assert_nothing_read(error: LpnetError, opened: list[Path]) -> None:
    """Neither the planted bytes nor the float they hold show in `error`, and no planted file was opened."""
    text = f"{error.message} {error.details}"
    assert MARKER.decode() not in text
    assert str(SECRET_FLOAT) not in text and "4242" not in text
    assert opened == []


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("place", sorted(EXTERNAL_DATA_MODELS))
def test_external_data_is_refused_without_opening_the_file(
    planted: PlantedFiles, place: str, location: str
) -> None:
    data = EXTERNAL_DATA_MODELS[place](planted.location(location)).SerializeToString()
    with opened_files(planted.secrets) as opened, pytest.raises(ExternalDataRefused) as info:
        network_from_onnx(data)
    assert info.value.code == "external_data_refused"
    tensor = info.value.details["tensor"]
    assert tensor == ("b" if place == "if_branch" else "high")
    assert f"tensor {tensor!r}" in info.value.message
    assert_nothing_read(info.value, opened)


def test_external_data_entries_without_the_location_flag_are_refused(planted: PlantedFiles) -> None:
    data = clip_model(external_tensor("high", "secret.bin", flagged=False), as_constant=False)
    with opened_files(planted.secrets) as opened, pytest.raises(ExternalDataRefused) as info:
        network_from_onnx(data.SerializeToString())
    assert "tensor 'high' (initializer of graph 'g')" in info.value.message
    assert_nothing_read(info.value, opened)


def _message_fields_reaching_tensors() -> list[FieldDescriptor]:
    """Every message field, among the types a ModelProto can hold, through which a TensorProto is reached."""
    types: dict[str, Descriptor] = {}
    queue = deque([ModelProto.DESCRIPTOR])
    while queue:
        message = queue.popleft()
        if message.full_name not in types:
            types[message.full_name] = message
            queue.extend(f.message_type for f in message.fields if f.message_type is not None)
    reaching = {TensorProto.DESCRIPTOR.full_name}
    grown = True
    while grown:
        before = len(reaching)
        for message in types.values():
            if any(
                f.message_type is not None and f.message_type.full_name in reaching for f in message.fields
            ):
                reaching.add(message.full_name)
        grown = len(reaching) > before
    return [
        field
        for message in types.values()
        for field in message.fields
        if field.message_type is not None and field.message_type.full_name in reaching
    ]


def _shortest_path(start: Descriptor, goal: Descriptor) -> list[FieldDescriptor]:
    paths: dict[str, list[FieldDescriptor]] = {start.full_name: []}
    queue = deque([start])
    while queue:
        message = queue.popleft()
        if message.full_name == goal.full_name:
            return paths[message.full_name]
        for field in message.fields:
            target = field.message_type
            if target is not None and target.full_name not in paths:
                paths[target.full_name] = [*paths[message.full_name], field]
                queue.append(target)
    raise AssertionError(f"no path from {start.full_name} to {goal.full_name}")


def _model_with_external_tensor_through(field: FieldDescriptor) -> ModelProto:
    """A model with one external-data tensor, placed at the end of a path that uses `field`."""
    path = [
        *_shortest_path(ModelProto.DESCRIPTOR, field.containing_type),
        field,
        *_shortest_path(field.message_type, TensorProto.DESCRIPTOR),
    ]
    model = ModelProto()
    message = model
    for step in path:
        message = getattr(message, step.name).add() if step.is_repeated else getattr(message, step.name)
    message.CopyFrom(external_tensor("planted", "secret.bin"))
    return model


@pytest.mark.parametrize(
    "field", _message_fields_reaching_tensors(), ids=lambda f: f"{f.containing_type.name}.{f.name}"
)
def test_external_data_is_refused_wherever_onnx_can_hold_a_tensor(
    planted: PlantedFiles, field: FieldDescriptor
) -> None:
    """Every place of the protobuf schema that can hold a tensor (subgraphs, functions, training ...)."""
    data = _model_with_external_tensor_through(field).SerializeToString()
    with opened_files(planted.secrets) as opened, pytest.raises(ExternalDataRefused) as info:
        network_from_onnx(data)
    assert info.value.details["tensor"] == "planted"
    assert_nothing_read(info.value, opened)
