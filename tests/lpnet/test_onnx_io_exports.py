"""Modules exported to ONNX by PyTorch, read back into the IR the tracer makes of the same module."""

from __future__ import annotations

import time
import tracemalloc

import onnx
import pytest
from onnx import helper

from lpnet.arch.from_torch import network_from_module, network_from_torchvision, torchvision_model
from lpnet.arch.ir import Network
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from tests.lpnet import onnx_fixtures
from tests.lpnet.onnx_hostile import (
    graph_with,
)

EXPORT_OPSETS = (7, 9, 11, 13, 17, 21)


def test_resnet18_onnx_has_the_same_hash_as_the_torchvision_path(resnet18_ir: Network) -> None:
    data = export_onnx(torchvision_model("resnet18"), resnet18_ir.input_shape)
    from_onnx = network_from_onnx(data)
    assert from_onnx.content_hash == resnet18_ir.content_hash
    assert len(from_onnx.layers) == len(resnet18_ir.layers)


def test_silu_and_squeeze_excitation_survive_onnx() -> None:
    net = network_from_torchvision("efficientnet_b0", (1, 3, 128, 128))
    data = export_onnx(torchvision_model("efficientnet_b0"), net.input_shape)
    assert network_from_onnx(data).content_hash == net.content_hash


@pytest.mark.parametrize("opset", EXPORT_OPSETS)
def test_shape_arithmetic_of_a_dynamic_batch_export_is_folded(opset: int) -> None:
    shape = (1, 3, 4, 4)
    data = export_onnx(onnx_fixtures.FlattenByView(), shape, opset=opset, dynamic_batch=True)
    ops = {node.op_type for node in onnx.load_from_string(data).graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= ops
    network = network_from_onnx(data)
    assert network.content_hash == network_from_module(onnx_fixtures.FlattenByFunction(), shape).content_hash
    assert [layer.op.value for layer in network.layers] == [
        "conv2d",
        "batchnorm2d",
        "relu6",
        "flatten",
        "linear",
    ]


@pytest.mark.parametrize("opset", EXPORT_OPSETS)
def test_means_over_height_and_width_are_pooling_layers(opset: int) -> None:
    shape = (1, 3, 4, 4)
    data = export_onnx(onnx_fixtures.MeanPooled(), shape, opset=opset, dynamic_batch=True)
    assert "ReduceMean" in {node.op_type for node in onnx.load_from_string(data).graph.node}
    expected = network_from_module(onnx_fixtures.AdaptivePooled(), shape)
    assert network_from_onnx(data).content_hash == expected.content_hash


@pytest.mark.parametrize("opset", EXPORT_OPSETS)
@pytest.mark.parametrize("model_name", ["squeezenet1_1", "mobilenet_v3_small"])
def test_torchvision_exports_at_every_opset_match_the_traced_module(model_name: str, opset: int) -> None:
    """Each opset's way of writing a layer reads back as that layer.

    Before opset 10 MaxPool's ceil_mode is written as padding at the end; before 14 HardSwish is
    written as x * HardSigmoid(x).
    """
    module = torchvision_model(model_name)
    data = export_onnx(module, (1, 3, 64, 64), opset=opset, dynamic_batch=True)
    expected = network_from_module(module, (2, 3, 64, 64))
    assert network_from_onnx(data, batch_size=2).content_hash == expected.content_hash


def test_symbolic_batch_is_fixed_to_one() -> None:
    net = network_from_onnx(graph_with(helper.make_node("Relu", ["c"], ["y"], name="relu")))
    assert net.input_shape == (1, 3, 8, 8)
    assert [layer.op.value for layer in net.layers] == ["conv2d", "relu"]


def test_symbolic_batch_takes_the_batch_size_and_a_fixed_batch_is_kept() -> None:
    dynamic = onnx_fixtures.plain_weights_model(17)
    network = network_from_onnx(dynamic.SerializeToString(), batch_size=4)
    assert network.input_shape == (4, 3, 16, 16)
    fixed = onnx_fixtures.plain_weights_model(17)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    assert network_from_onnx(fixed.SerializeToString(), batch_size=4).input_shape[0] == 2
    exported = export_onnx(onnx_fixtures.FlattenByView(), (1, 3, 4, 4), dynamic_batch=True)
    assert network_from_onnx(exported, batch_size=8).input_shape == (8, 3, 4, 4)


@pytest.mark.slow
def test_resnet50_export_converts_fast_without_copying_its_weights() -> None:
    module = torchvision_model("resnet50")
    data = export_onnx(module, (1, 3, 224, 224), dynamic_batch=True)
    del module
    tracemalloc.start()
    try:
        started = time.perf_counter()
        network = network_from_onnx(data, batch_size=2)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert network.input_shape[0] == 2 and len(network.layers) == 175
    assert elapsed < 10.0
    # The file holds about 100 MB of weights; serialising it for shape inference would copy them all.
    assert peak < len(data) // 4
