"""Other ways files write the same layers: means over H and W, sums of tensors, old-opset batch norm."""

from __future__ import annotations

import pytest
from onnx import helper

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.onnx_io import network_from_onnx
from lpnet.errors import (
    UnsupportedOperator,
)
from tests.lpnet import onnx_fixtures


@pytest.mark.parametrize("opset", [13, 18, 21])
@pytest.mark.parametrize("axes", [(2, 3), (-1, -2)])
@pytest.mark.parametrize("keepdims", [True, False])
def test_reduce_mean_with_axes_as_attribute_or_input(
    opset: int, axes: tuple[int, ...], keepdims: bool
) -> None:
    data = onnx_fixtures.reduce_mean_model(opset, axes, keepdims=keepdims).SerializeToString()
    network = network_from_onnx(data)
    assert (
        network.content_hash
        == network_from_onnx(onnx_fixtures.global_pool_model(opset).SerializeToString()).content_hash
    )
    assert (
        network.content_hash
        == network_from_module(onnx_fixtures.pooled_classifier(), (1, 3, 8, 8)).content_hash
    )
    pooled = network.by_name["mean"]
    assert (pooled.op.value, pooled.out_hw, pooled.out_channels) == ("adaptive_avgpool2d", (1, 1), 8)


@pytest.mark.parametrize(
    ("axes", "shown"), [((1, 2, 3), "axes [1, 2, 3]"), ((3,), "axes [3]"), (None, "all axes")]
)
def test_reduce_mean_over_other_axes_is_refused_naming_them(axes: tuple[int, ...] | None, shown: str) -> None:
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(onnx_fixtures.mean_output_model(axes).SerializeToString())
    assert (info.value.op, info.value.layer) == ("ReduceMean", "mean")
    assert shown in info.value.message


def test_sum_of_tensors_is_one_add_layer() -> None:
    network = network_from_onnx(onnx_fixtures.sum_model("a", "b", "c").SerializeToString())
    total = network.by_name["total"]
    assert total.op.value == "add" and sorted(total.inputs) == ["conv_a", "conv_b", "conv_c"]
    pair = network_from_onnx(onnx_fixtures.sum_model("a", "b").SerializeToString())
    added = network_from_onnx(onnx_fixtures.sum_model("a", "b", op_type="Add").SerializeToString())
    assert pair.content_hash == added.content_hash
    single = network_from_onnx(onnx_fixtures.sum_model("a").SerializeToString())
    assert [layer.op.value for layer in single.layers] == ["conv2d"] * 3


def test_sum_with_a_constant_and_max_of_tensors_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedOperator, match="not constants") as info:
        network_from_onnx(onnx_fixtures.sum_model("a", "k").SerializeToString())
    assert (info.value.op, info.value.layer) == ("Sum", "total")
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(onnx_fixtures.sum_model("a", "b", op_type="Max").SerializeToString())
    assert (info.value.op, info.value.layer) == ("Max", "total")


def test_per_activation_batch_norm_of_old_opsets_is_refused_naming_the_opset() -> None:
    model = onnx_fixtures.plain_weights_model(7)
    (bn,) = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    bn.attribute.append(helper.make_attribute("spatial", 0))
    with pytest.raises(UnsupportedOperator, match="spatial=0") as info:
        network_from_onnx(model.SerializeToString())
    assert (info.value.op, info.value.layer) == ("BatchNormalization", "bn")
    assert "opset 7" in info.value.message
