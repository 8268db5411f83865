"""ONNX files read back into the IR."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from lpnet.arch.from_torch import network_from_torchvision, torchvision_model
from lpnet.arch.ir import Network
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.errors import InvalidArchitecture, UnsupportedOperator


def test_resnet18_onnx_has_the_same_hash_as_the_torchvision_path(resnet18_ir: Network) -> None:
    data = export_onnx(torchvision_model("resnet18"), resnet18_ir.input_shape)
    from_onnx = network_from_onnx(data)
    assert from_onnx.content_hash == resnet18_ir.content_hash
    assert len(from_onnx.layers) == len(resnet18_ir.layers)


def test_silu_and_squeeze_excitation_survive_onnx() -> None:
    net = network_from_torchvision("efficientnet_b0", (1, 3, 128, 128))
    data = export_onnx(torchvision_model("efficientnet_b0"), net.input_shape)
    assert network_from_onnx(data).content_hash == net.content_hash


def _graph_with(node: onnx.NodeProto) -> bytes:
    conv_w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], [0.1] * 12)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]), node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[conv_w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_unsupported_onnx_op_is_named_with_its_node() -> None:
    data = _graph_with(helper.make_node("Softmax", ["c"], ["y"], name="probabilities", axis=1))
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(data)
    assert (info.value.op, info.value.layer) == ("Softmax", "probabilities")


def test_symbolic_batch_is_fixed_to_one() -> None:
    net = network_from_onnx(_graph_with(helper.make_node("Relu", ["c"], ["y"], name="relu")))
    assert net.input_shape == (1, 3, 8, 8)
    assert [layer.op.value for layer in net.layers] == ["conv2d", "relu"]


def test_garbage_bytes_are_rejected_clearly() -> None:
    with pytest.raises(InvalidArchitecture, match="ONNX"):
        network_from_onnx(b"\x00\x01 definitely not protobuf")
