"""JSON IR: round trip, content hash, and validation errors that name the bad field."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lpnet.arch.ir import (
    MAX_BATCH,
    MAX_CHANNELS,
    MAX_LAYER_INPUTS,
    MAX_LAYERS,
    MAX_SPATIAL,
    MAX_WINDOW,
    Network,
    activation_bytes,
)
from lpnet.errors import ArchitectureTooLarge, InvalidArchitecture


def _tiny() -> dict[str, Any]:
    return {
        "name": "tiny",
        "input_shape": [1, 3, 8, 8],
        "layers": [
            {
                "name": "c1",
                "op": "conv2d",
                "inputs": ["input"],
                "in_channels": 3,
                "out_channels": 4,
                "in_hw": [8, 8],
                "out_hw": [8, 8],
                "kernel": [3, 3],
                "padding": [1, 1],
            },
            {
                "name": "r1",
                "op": "relu",
                "inputs": ["c1"],
                "in_channels": 4,
                "out_channels": 4,
                "in_hw": [8, 8],
                "out_hw": [8, 8],
            },
            {
                "name": "c2",
                "op": "conv2d",
                "inputs": ["r1"],
                "in_channels": 4,
                "out_channels": 4,
                "in_hw": [8, 8],
                "out_hw": [8, 8],
            },
            {
                "name": "sum",
                "op": "add",
                "inputs": ["c2", "c1"],
                "in_channels": 4,
                "out_channels": 4,
                "in_hw": [8, 8],
                "out_hw": [8, 8],
            },
        ],
        "outputs": ["sum"],
    }


def test_round_trip_preserves_network_and_hash(resnet18_ir: Network) -> None:
    again = Network.from_json(resnet18_ir.to_json())
    assert again == resnet18_ir
    assert again.content_hash == resnet18_ir.content_hash


def test_hash_ignores_names_and_metadata_but_not_structure() -> None:
    base = Network.from_dict(_tiny())
    renamed = _tiny()
    mapping = {"c1": "a", "r1": "b", "c2": "c", "sum": "d"}
    for layer in renamed["layers"]:
        layer["name"] = mapping[layer["name"]]
        layer["inputs"] = [mapping.get(i, i) for i in layer["inputs"]]
    renamed["outputs"] = ["d"]
    renamed["name"] = "other"
    renamed["layers"][3]["inputs"].reverse()  # add commutes
    assert Network.from_dict(renamed).content_hash == base.content_hash
    changed = _tiny()
    changed["layers"][2]["bias"] = True
    assert Network.from_dict(changed).content_hash != base.content_hash


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["layers"][0].update(out_channels=-4), "layers.0.out_channels"),
        (lambda d: d["layers"][1].update(inputs=["nowhere"]), "'nowhere', which no layer produces"),
        (lambda d: d["layers"][1].update(inputs=["c2"]), "topological order and the graph must be acyclic"),
        (lambda d: d["layers"][2].update(in_channels=5), "produces 4 channels but in_channels=5"),
        (lambda d: d["layers"][0].update(op="roi_align"), "layers.0.op"),
        (lambda d: d["layers"][0].update(out_hw=[9, 9]), "out_hw=(9, 9)"),
        (lambda d: d.update(outputs=["ghost"]), "output 'ghost'"),
        (lambda d: d["layers"][2].update(name="c1"), "unique"),
        (lambda d: d["layers"][0].update(groups=2), "groups=2 must divide in_channels=3"),
    ],
)
def test_malformed_document_names_the_problem(mutate: Any, expected: str) -> None:
    doc = _tiny()
    mutate(doc)
    with pytest.raises(InvalidArchitecture) as info:
        Network.from_json(json.dumps(doc))
    assert expected in str(info.value)
    assert info.value.details["errors"], "the details list each field error"


def test_not_json_at_all_is_an_invalid_architecture() -> None:
    with pytest.raises(InvalidArchitecture):
        Network.from_json(b"{not json")


def _relu_chain(length: int) -> dict[str, Any]:
    """A conv followed by `length - 1` relus: a valid network of `length` layers."""
    doc = _tiny()
    layers = [doc["layers"][0]]
    for i in range(1, length):
        layers.append({**doc["layers"][1], "name": f"r{i}", "inputs": [layers[-1]["name"]]})
    return {**doc, "layers": layers, "outputs": [layers[-1]["name"]]}


def _validation_seconds(doc: dict[str, Any]) -> float:
    """The least CPU time of three validations (one can be slowed by a garbage collection)."""
    text = json.dumps(doc)
    times = []
    for _ in range(3):
        start = time.process_time()
        try:
            Network.from_json(text)
        except InvalidArchitecture:
            pass
        times.append(time.process_time() - start)
    return min(times)


def test_thousands_of_layers_validate_in_linear_time_even_with_a_repeated_name() -> None:
    doc = _relu_chain(4000)
    clean = _validation_seconds(doc)
    assert clean < 2.0
    doc["layers"][-1]["name"] = "r1"
    doc["outputs"] = ["r1"]
    with pytest.raises(InvalidArchitecture, match=r"unique; repeated: \['r1'\]"):
        Network.from_dict(doc)
    # Finding the repeated name costs about what validating the whole network does; a search that
    # compared every pair of 4,000 names would cost thousands of times more.
    assert _validation_seconds(doc) < 10 * clean + 0.1


def test_a_network_over_the_layer_cap_is_refused_naming_the_cap() -> None:
    with pytest.raises(InvalidArchitecture) as info:
        Network.from_dict(_relu_chain(MAX_LAYERS + 1))
    (error,) = info.value.details["errors"]
    assert error["field"] == "layers"
    assert f"at most {MAX_LAYERS} items" in error["message"]
    assert len(Network.from_dict(_relu_chain(MAX_LAYERS)).layers) == MAX_LAYERS


def test_a_layer_over_the_input_cap_is_refused_naming_the_cap() -> None:
    doc = _relu_chain(3)
    add = {**doc["layers"][1], "name": "sum", "op": "add", "inputs": ["c1", "r1"] * MAX_LAYER_INPUTS}
    doc["layers"].append(add)
    doc["outputs"] = ["sum"]
    with pytest.raises(InvalidArchitecture) as info:
        Network.from_dict(doc)
    assert [e["field"] for e in info.value.details["errors"]] == ["layers.3.inputs"]
    assert f"at most {MAX_LAYER_INPUTS} items" in str(info.value)


@pytest.mark.parametrize("value", [10**9, 10**400])
@pytest.mark.parametrize(
    ("path", "bound"),
    [
        (("input_shape", 0), MAX_BATCH),
        (("input_shape", 1), MAX_CHANNELS),
        (("input_shape", 2), MAX_SPATIAL),
        (("layers", 0, "in_channels"), MAX_CHANNELS),
        (("layers", 0, "out_channels"), MAX_CHANNELS),
        (("layers", 0, "in_hw", 1), MAX_SPATIAL),
        (("layers", 0, "out_hw", 0), MAX_SPATIAL),
        (("layers", 0, "kernel", 0), MAX_WINDOW),
        (("layers", 0, "stride", 1), MAX_WINDOW),
        (("layers", 0, "padding", 0), MAX_WINDOW),
        (("layers", 0, "dilation", 0), MAX_WINDOW),
        (("layers", 0, "groups"), MAX_CHANNELS),
    ],
)
def test_every_dimension_is_bounded_and_the_error_names_the_field(
    path: tuple[str | int, ...], bound: int, value: int
) -> None:
    doc = _tiny()
    doc["layers"][0].update(stride=[1, 1], dilation=[1, 1])
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(InvalidArchitecture) as info:
        Network.from_json(json.dumps(doc))
    field = ".".join(str(part) for part in path)
    assert {
        "field": field,
        "message": f"Input should be less than or equal to {bound}",
    } in info.value.details["errors"]


def _conv(name: str, source: str, channels: tuple[int, int], hw: int, kernel: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "op": "conv2d",
        "inputs": [source],
        "in_channels": channels[0],
        "out_channels": channels[1],
        "in_hw": [hw, hw],
        "out_hw": [hw, hw],
        "kernel": [kernel, kernel],
        "padding": [kernel // 2, kernel // 2],
    }


def _relu(name: str, source: str, channels: int, hw: int) -> dict[str, Any]:
    return {
        "name": name,
        "op": "relu",
        "inputs": [source],
        "in_channels": channels,
        "out_channels": channels,
        "in_hw": [hw, hw],
        "out_hw": [hw, hw],
    }


def _eight_branches(side: int) -> dict[str, Any]:
    """Eight relus of the input, summed: nine input-sized tensors alive at once."""
    branches = [_relu(f"r{i}", "input", 8, side) for i in range(8)]
    total = {**_relu("sum", "r0", 8, side), "op": "add", "inputs": [b["name"] for b in branches]}
    return {"input_shape": [1, 8, side, side], "layers": [*branches, total], "outputs": ["sum"]}


@pytest.mark.parametrize(
    ("doc", "bound", "value"),
    [
        # 65,536 x 65,536 weights of a 1x1 convolution.
        (
            {
                "input_shape": [1, 65536, 1, 1],
                "layers": [_conv("fc", "input", (65536, 65536), 1)],
                "outputs": ["fc"],
            },
            "MAX_PARAMS",
            65536 * 65536,
        ),
        # A 3x3 convolution of 4,096 channels on a 256x256 map.
        (
            {
                "input_shape": [1, 4096, 256, 256],
                "layers": [_conv("c", "input", (4096, 4096), 256, 3)],
                "outputs": ["c"],
            },
            "MAX_MACS",
            4096 * 4096 * 9 * 256 * 256,
        ),
        # One 8,192-channel 2,048x2,048 activation: 128 GiB.
        (
            {
                "input_shape": [1, 3, 2048, 2048],
                "layers": [_conv("c", "input", (3, 8192), 2048)],
                "outputs": ["c"],
            },
            "MAX_TENSOR_BYTES",
            8192 * 2048 * 2048 * 4,
        ),
        # Every tensor 2 GiB, 18 GiB of them alive when the sum is computed.
        (_eight_branches(8192), "MAX_ACTIVATION_BYTES", 9 * 8 * 8192 * 8192 * 4),
    ],
)
def test_costly_networks_are_refused_naming_the_bound_and_the_value(
    doc: dict[str, Any], bound: str, value: int
) -> None:
    with pytest.raises(ArchitectureTooLarge) as info:
        Network.from_json(json.dumps(doc))
    assert f"{value:,}" in info.value.message and bound in info.value.message
    assert [e["field"] for e in info.value.details["errors"]] == ["(root)"]


def test_an_input_tensor_over_the_bound_is_refused_at_the_input_shape() -> None:
    doc = _tiny()
    doc["input_shape"] = [1024, 3, 8192, 8192]
    with pytest.raises(ArchitectureTooLarge) as info:
        Network.from_json(json.dumps(doc))
    assert [e["field"] for e in info.value.details["errors"]] == ["input_shape"]
    assert (
        f"{1024 * 3 * 8192 * 8192 * 4:,}" in info.value.message and "MAX_TENSOR_BYTES" in info.value.message
    )


def test_activation_bytes_frees_each_tensor_after_its_last_consumer() -> None:
    net = Network.from_dict(_tiny())
    unit = 4 * 8 * 8 * 4  # one (1, 4, 8, 8) float32 tensor
    # The input (3 channels) is freed after c1; c1 lives until the sum, so c1 + r1 + c2 is the peak.
    assert activation_bytes(net) == (unit, 3 * unit)
    side = 8192
    assert activation_bytes(Network.from_dict(_eight_branches(side // 2))) == (
        8 * (side // 2) ** 2 * 4,
        9 * 8 * (side // 2) ** 2 * 4,
    )
