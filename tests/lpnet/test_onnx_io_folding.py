"""Constants computed by the graph: folded into weights and shapes, checked against the limits first."""

from __future__ import annotations

import time
import tracemalloc

import onnx
import pytest
from onnx import TensorProto, helper

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.onnx_io import limits, network_from_onnx
from lpnet.errors import (
    InvalidArchitecture,
    LpnetError,
    OnnxLimitExceeded,
    UnsupportedOperator,
)
from tests.lpnet import onnx_fixtures
from tests.lpnet.onnx_hostile import conv_model

FOLDING_OPSETS = (9, 11, 13, 17, 21)  # ConstantOfShape, which Caffe2 exports use, exists from opset 9


@pytest.mark.parametrize("opset", FOLDING_OPSETS)
def test_weights_computed_from_constants_give_the_ir_of_plain_weights(opset: int) -> None:
    folded = network_from_onnx(onnx_fixtures.plain_weights_model(opset).SerializeToString())
    computed = network_from_onnx(onnx_fixtures.caffe2_style_model(opset).SerializeToString())
    assert computed.content_hash == folded.content_hash
    module = network_from_module(onnx_fixtures.stem_and_classifier(), onnx_fixtures.IMAGE_SHAPE)
    assert computed.content_hash == module.content_hash
    assert [layer.op.value for layer in computed.layers] == [
        "conv2d",
        "batchnorm2d",
        "relu",
        "adaptive_avgpool2d",
        "flatten",
        "linear",
    ]


@pytest.mark.parametrize(
    "dims",
    [[10**12], [2**16, 2**16], [2**31 + 1]],
    ids=["a trillion elements", "2^32 elements in two dims", "a dimension above the limit"],
)
def test_a_huge_constant_of_shape_is_refused_before_it_is_filled(dims: list[int]) -> None:
    data = onnx_fixtures.constant_of_shape_model(dims).SerializeToString()
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(data)
    assert time.perf_counter() - started < 5.0
    assert info.value.details["limit"] == "tensor_elements"
    assert info.value.details["maximum"] == limits.MAX_TENSOR_ELEMENTS
    assert "constant 'huge' computed by node 'huge'" in info.value.message


def test_a_large_constant_within_the_limits_keeps_its_shape_and_is_never_filled() -> None:
    # 2^28 float32 elements would take 1 GiB if computed.
    data = onnx_fixtures.constant_of_shape_model([2**14, 2**14]).SerializeToString()
    tracemalloc.start()
    try:
        network = network_from_onnx(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [layer.op.value for layer in network.layers] == ["conv2d"]
    assert peak < 64 * 2**20


def _constant(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant",
        [],
        [name],
        name=name,
        value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values),
    )


@pytest.mark.parametrize(
    "nodes",
    [
        [
            _constant("n", [10**6]),
            helper.make_node("Mul", ["n", "n"], ["size"], name="square"),
            helper.make_node("ConstantOfShape", ["size"], ["huge"], name="huge"),
        ],
        [
            _constant("one", [1]),
            _constant("size", [10**12]),
            helper.make_node("Expand", ["one", "size"], ["huge"], name="huge"),
        ],
        [
            _constant("one", [1]),
            _constant("repeats", [10**12]),
            helper.make_node("Tile", ["one", "repeats"], ["huge"], name="huge"),
        ],
    ],
    ids=["ConstantOfShape of a computed shape", "Expand", "Tile"],
)
def test_computed_constants_are_checked_against_the_limits_before_evaluation(
    nodes: list[onnx.NodeProto],
) -> None:
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(onnx_fixtures.constant_nodes_model(*nodes).SerializeToString())
    assert time.perf_counter() - started < 5.0
    assert info.value.details["limit"] == "tensor_elements" and info.value.details["found"] == 10**12
    assert "node 'huge'" in info.value.message


@pytest.mark.parametrize(
    ("nodes", "error", "names"),
    [
        pytest.param(
            [
                _constant("row", [1, 2, 3]),
                _constant("index", [7]),
                helper.make_node("Gather", ["row", "index"], ["picked"], name="pick"),
            ],
            InvalidArchitecture,
            ("pick", "Gather", "shape inference failed", "indices must be in"),
            id="index out of range",
        ),
        pytest.param(
            [
                _constant("flat", [1, 2, 3]),
                _constant("shape", [2, 2]),
                helper.make_node("Reshape", ["flat", "shape"], ["square"], name="square"),
            ],
            InvalidArchitecture,
            ("square", "Reshape", "could not be evaluated", "cannot reshape"),
            id="reshape to a shape of another size",
        ),
        pytest.param(
            [_constant("k", [1]), helper.make_node("Erf", ["k"], ["e"], name="erf_of_constant")],
            UnsupportedOperator,
            ("Erf", "erf_of_constant", "computing only on constants"),
            id="operator that is not folded",
        ),
        pytest.param(
            [
                helper.make_node("Shape", ["x"], ["s"], name="shape"),
                helper.make_node("Gather", ["x", "s"], ["g"], name="gather"),
            ],
            UnsupportedOperator,
            ("Gather", "gather"),
            id="shape arithmetic applied to the image",
        ),
    ],
)
def test_constant_computations_that_cannot_be_folded_are_named(
    nodes: list[onnx.NodeProto], error: type[LpnetError], names: tuple[str, ...]
) -> None:
    with pytest.raises(error) as info:
        network_from_onnx(onnx_fixtures.constant_nodes_model(*nodes).SerializeToString())
    for name in names:
        assert name in info.value.message


def test_a_shape_scattered_into_constants_is_folded_as_scatternd_writes_it() -> None:
    # ScatterND([1, 1], [[1]], [256]) is [1, 256], which flattens the (1, 4, 8, 8) map.
    nodes = [
        _constant("ones", [1, 1]),
        helper.make_node(
            "Constant", [], ["where"], value=helper.make_tensor("where", TensorProto.INT64, [1, 1], [1])
        ),
        _constant("size", [256]),
        helper.make_node("ScatterND", ["ones", "where", "size"], ["shape"], name="scatter"),
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="flatten"),
    ]
    network = network_from_onnx(conv_model(*nodes).SerializeToString())
    assert [(layer.op.value, layer.out_channels) for layer in network.layers] == [
        ("conv2d", 4),
        ("flatten", 256),
    ]


def test_float_arithmetic_on_constants_may_overflow_or_divide_by_zero() -> None:
    # Weights computed from constants are folded but never read: inf in one does not fail the file.
    big = helper.make_tensor("big", TensorProto.FLOAT, [2], [3e38, 1.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [2], [0.0, 0.0])
    nodes = [
        helper.make_node("Add", ["big", "big"], ["infinite"], name="overflow"),
        helper.make_node("Div", ["big", "zero"], ["ratio"], name="ratio"),
    ]
    data = onnx_fixtures.constant_nodes_model(*nodes, initializers=[big, zero]).SerializeToString()
    assert [layer.op.value for layer in network_from_onnx(data).layers] == ["conv2d"]


def test_folding_more_nodes_than_the_limit_is_refused_in_bounded_time() -> None:
    count = limits.MAX_FOLDED_NODES + 1
    names = ["k0", *(f"k{i}" for i in range(1, count + 1))]
    nodes = [helper.make_node("Identity", [names[i]], [names[i + 1]], name=f"n{i}") for i in range(count)]
    first = helper.make_tensor("k0", TensorProto.FLOAT, [4], [1.0] * 4)
    data = onnx_fixtures.constant_nodes_model(*nodes, initializers=[first]).SerializeToString()
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(data)
    assert time.perf_counter() - started < 10.0
    assert info.value.details == {
        "limit": "folded_nodes",
        "found": count,
        "maximum": limits.MAX_FOLDED_NODES,
    }
