"""JSON IR: round trip, content hash, and validation errors that name the bad field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lpnet.arch.ir import Network
from lpnet.errors import InvalidArchitecture


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
        (lambda d: d["layers"][0].update(op="softmax"), "layers.0.op"),
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
