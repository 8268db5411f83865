"""Models above the count, rank, channel and size limits are refused quickly, naming the limit."""

from __future__ import annotations

import time
from collections.abc import Callable

import onnx
import pytest
from onnx import ModelProto, TensorProto, helper

from lpnet.arch.ir import MAX_CHANNELS, MAX_SPATIAL
from lpnet.arch.onnx_io import limits, network_from_onnx
from lpnet.errors import (
    OnnxLimitExceeded,
)
from tests.lpnet.onnx_hostile import (
    conv_model,
    image_input,
    relu_chain,
    relu_model,
)


def test_a_hundred_thousand_nodes_are_refused_before_shape_inference() -> None:
    data = relu_chain(100_000)
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(data)
    assert time.perf_counter() - started < 5.0
    assert info.value.details == {"limit": "nodes", "found": 100_000, "maximum": limits.MAX_NODES}
    assert "100000" in info.value.message and str(limits.MAX_NODES) in info.value.message


def test_a_billion_channels_are_refused_at_once() -> None:
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(relu_chain(2, channels=10**9))
    assert time.perf_counter() - started < 5.0
    assert info.value.details == {"limit": "channels", "found": 10**9, "maximum": MAX_CHANNELS}
    assert "'x'" in info.value.message


def test_tensor_limits_apply_to_inferred_shapes_and_constants() -> None:
    # Weights without data: shape inference reads only their dims, and a file declares any dims it likes.
    weight = TensorProto(name="wide", data_type=TensorProto.FLOAT, dims=[10**9, 4, 1, 1])
    wide = conv_model(
        helper.make_node("Conv", ["c", "wide"], ["y"], name="wide_conv", kernel_shape=[1, 1]),
        initializers=[weight],
    )
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(wide.SerializeToString())
    assert info.value.details["limit"] == "tensor_elements" and info.value.details["found"] == 4 * 10**9
    assert "tensor 'wide' (initializer of graph 'g')" in info.value.message
    weight.dims[:] = [10**6, 4, 1, 1]
    million_channels = conv_model(
        helper.make_node("Conv", ["c", "wide"], ["y"], name="wide_conv", kernel_shape=[1, 1]),
        initializers=[weight],
    )
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(million_channels.SerializeToString())
    assert info.value.details == {"limit": "channels", "found": 10**6, "maximum": MAX_CHANNELS}
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(relu_model(image_input(shape=(1, 3, 9000, 8))))
    assert info.value.details == {"limit": "spatial_size", "found": 9000, "maximum": MAX_SPATIAL}


def _nested_ifs(depth: int) -> onnx.GraphProto:
    """A graph with an If whose then-branch holds an If ... `depth` levels down."""
    nodes = []
    if depth:
        empty = helper.make_graph([], "empty", [], [])
        nodes = [
            helper.make_node("If", ["cond"], ["b"], then_branch=_nested_ifs(depth - 1), else_branch=empty)
        ]
    return helper.make_graph(
        nodes, f"level{depth}", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [])]
    )


def _too_many_tensors() -> ModelProto:
    initializers = [
        helper.make_tensor(f"t{i}", TensorProto.FLOAT, [], [0.0]) for i in range(limits.MAX_TENSORS + 1)
    ]
    return conv_model(helper.make_node("Relu", ["c"], ["y"]), initializers=initializers)


def _too_many_values() -> ModelProto:
    return conv_model(helper.make_node("Sum", ["c"] * limits.MAX_VALUES, ["y"], name="sum"))


def _too_many_attributes() -> ModelProto:
    relu = helper.make_node("Relu", ["c"], ["y"], name="relu")
    relu.attribute.extend(helper.make_attribute(f"a{i}", i) for i in range(limits.MAX_ATTRIBUTES + 1))
    return conv_model(relu)


def _too_many_graphs() -> ModelProto:
    relu = helper.make_node("Relu", ["c"], ["y"], name="relu")
    empty = helper.make_graph([], "empty", [], [])
    relu.attribute.append(helper.make_attribute("bodies", [empty] * (limits.MAX_GRAPHS + 1)))
    return conv_model(relu)


def _too_deep() -> ModelProto:
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    deep = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="deep",
        then_branch=_nested_ifs(limits.MAX_SUBGRAPH_DEPTH),
        else_branch=_nested_ifs(0),
    )
    return conv_model(deep, initializers=[cond])


@pytest.mark.parametrize(
    ("limit", "maximum", "build"),
    [
        ("tensors", limits.MAX_TENSORS, _too_many_tensors),
        ("values", limits.MAX_VALUES, _too_many_values),
        ("attributes", limits.MAX_ATTRIBUTES, _too_many_attributes),
        ("graphs", limits.MAX_GRAPHS, _too_many_graphs),
        ("subgraph_depth", limits.MAX_SUBGRAPH_DEPTH, _too_deep),
    ],
)
def test_count_limits_are_named_with_the_value_found(
    limit: str, maximum: int, build: Callable[[], ModelProto]
) -> None:
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(build().SerializeToString())
    assert info.value.details["limit"] == limit and info.value.details["maximum"] == maximum
    assert info.value.details["found"] > maximum
    assert f"{info.value.details['found']}" in info.value.message and f"({limit})" in info.value.message
