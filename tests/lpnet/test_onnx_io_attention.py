"""ViT exported by torch.onnx.export, read back with its self-attention as `attention` layers.

The exported self-attention is a subgraph of some thirty nodes; a graph that differs from it in any
node (another softmax axis, another scale, q and k swapped, a value used outside it) is refused by
name, never read as a different attention.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import ModelProto, helper, numpy_helper
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from lpnet.arch.counting import network_cost
from lpnet.arch.from_torch import network_from_module, network_from_torchvision, torchvision_model
from lpnet.arch.ir import Network
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.errors import UnsupportedOperator
from service.api.errors import LPNET_ERROR_STATUS

SHAPE = (1, 3, 32, 32)


def small_vit() -> VisionTransformer:
    """Two encoder blocks of 4 heads over 16 patches and the class token: every node ViT-B/16 exports."""
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()


@pytest.fixture(scope="module")
def vit_export() -> bytes:
    return export_onnx(small_vit(), SHAPE)


def layer_list(network: Network) -> list[tuple[object, ...]]:
    """Every layer's operator, shapes and fields, in order, without its name."""
    return [
        (layer.op, layer.in_channels, layer.out_channels, layer.in_hw, layer.out_hw, layer.kernel)
        + (layer.groups, layer.bias, layer.shift, layer.position_bias)
        for layer in network.layers
    ]


def test_a_vit_export_reads_as_the_traced_module(vit_export: bytes) -> None:
    traced = network_from_module(small_vit(), SHAPE)
    network = network_from_onnx(vit_export)
    assert layer_list(network) == layer_list(traced)
    assert network.content_hash == traced.content_hash
    assert network_cost(network) == network_cost(traced)
    attention = [layer for layer in network.layers if layer.op.value == "attention"]
    assert [(a.groups, a.kernel, a.in_hw, a.bias) for a in attention] == [(4, (1, 17), (1, 17), True)] * 2


def test_a_vit_export_with_a_dynamic_batch_takes_the_batch_size() -> None:
    data = export_onnx(small_vit(), SHAPE, dynamic_batch=True)
    expected = network_from_module(small_vit(), (3, *SHAPE[1:]))
    assert network_from_onnx(data, batch_size=3).content_hash == expected.content_hash


class TokenMixer(nn.Module):
    """Patches of a map attending to each other through projections without biases."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.attention = nn.MultiheadAttention(16, num_heads=2, bias=False, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patches(x)
        tokens = patches.reshape(patches.shape[0], patches.shape[1], -1).transpose(1, 2)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(mixed[:, 0])


def test_an_attention_without_biases_reads_as_one_without_biases() -> None:
    module = TokenMixer().eval()
    network = network_from_onnx(export_onnx(module, SHAPE))
    assert network.content_hash == network_from_module(module, SHAPE).content_hash
    (attention,) = [layer for layer in network.layers if layer.op.value == "attention"]
    assert (attention.groups, attention.kernel, attention.bias) == (2, (1, 16), False)


@pytest.mark.slow
def test_vit_b_16_export_has_the_layers_and_macs_of_the_torchvision_path() -> None:
    expected = network_from_torchvision("vit_b_16")
    network = network_from_onnx(export_onnx(torchvision_model("vit_b_16"), expected.input_shape))
    assert layer_list(network) == layer_list(expected)
    assert network_cost(network).macs == network_cost(expected).macs
    assert network.content_hash == expected.content_hash


# Graphs that differ from the exported self-attention in one node ---------------------------------


def _attention_nodes(model: ModelProto, op_type: str) -> list[onnx.NodeProto]:
    """The nodes of `op_type` inside the first encoder block's self-attention, in graph order."""
    scope = "/encoder/layers/encoder_layer_0/self_attention/"
    return [node for node in model.graph.node if node.op_type == op_type and node.name.startswith(scope)]


def _softmax_over_queries(model: ModelProto) -> str:
    (softmax,) = _attention_nodes(model, "Softmax")
    del softmax.attribute[:]
    softmax.attribute.append(helper.make_attribute("axis", 2))
    return softmax.name


def _scores_scaled_twice(model: ModelProto) -> str:
    query_scale = _attention_nodes(model, "Mul")[0]
    double = numpy_helper.from_array(np.array([2.0 / 32**0.25], dtype=np.float32), "double_scale")
    model.graph.initializer.append(double)
    query_scale.input[1] = "double_scale"
    return _attention_nodes(model, "MatMul")[1].name


def _queries_and_keys_swapped(model: ModelProto) -> str:
    stacked = {node.output[0] for node in _attention_nodes(model, "Squeeze")}
    query, key = [node for node in _attention_nodes(model, "Gather") if node.input[0] in stacked][:2]
    query.input[1], key.input[1] = key.input[1], query.input[1]
    # The keys' transpose now reads the queries: the first node off the pattern.
    (keys_transposed,) = [
        node for node in _attention_nodes(model, "Transpose") if list(node.attribute[0].ints) == [0, 1, 3, 2]
    ]
    return keys_transposed.name


def _output_projection_without_bias(model: ModelProto) -> str:
    (gemm,) = _attention_nodes(model, "Gemm")
    del gemm.input[2]
    return gemm.name


def _weights_also_an_output(model: ModelProto) -> str:
    (softmax,) = _attention_nodes(model, "Softmax")
    model.graph.output.append(helper.make_empty_tensor_value_info(softmax.output[0]))
    return softmax.name


@pytest.mark.parametrize(
    "mutate",
    [
        _softmax_over_queries,
        _scores_scaled_twice,
        _queries_and_keys_swapped,
        _output_projection_without_bias,
        _weights_also_an_output,
    ],
)
def test_a_self_attention_differing_in_one_node_is_refused_naming_it(
    vit_export: bytes, mutate: Callable[[ModelProto], str]
) -> None:
    model = onnx.load_from_string(vit_export)
    node = mutate(model)
    with pytest.raises(UnsupportedOperator) as refused:
        network_from_onnx(model.SerializeToString())
    assert refused.value.op == "attention"
    assert f"node {node!r}" in refused.value.message
    assert LPNET_ERROR_STATUS[type(refused.value)] == 422
