"""Swin (v1 and v2) and MaxViT exported by torch.onnx.export, read back with their windowed attention
as `attention` layers, Swin's patch merging as `space_to_depth` and MaxViT's partitions as views.

Each export is compared with the traced module: the same layers, hash and cost. A graph that differs
from the exported pattern in one node is refused naming that node, never read as another network.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import ModelProto, helper, numpy_helper
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from lpnet.arch.counting import network_cost
from lpnet.arch.from_torch import network_from_module, network_from_torchvision, torchvision_model
from lpnet.arch.ir import Network, Op
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.errors import LpnetError, UnsupportedOperator
from service.api.errors import LPNET_ERROR_STATUS

SWIN_SHAPE = (1, 3, 40, 40)  # 10x10 patches: windows of 4x4 over a map padded to 12x12, then 5x5 to 8x8
MAXVIT_SHAPE = (1, 3, 32, 32)


def small_swin(v2: bool = False) -> SwinTransformer:
    """Two stages of two blocks (the second shifted) and a patch merging of an odd 5x5 map to 3x3."""
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=10,
        **extra,
    ).eval()


def small_maxvit() -> MaxVit:
    """Two blocks, each a window attention over 2x2 blocks and a grid attention over a 2x2 grid."""
    return MaxVit(
        input_size=MAXVIT_SHAPE[2:],
        stem_channels=8,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=10,
    ).eval()


def layer_list(network: Network) -> list[tuple[object, ...]]:
    """Every layer's operator, shapes and fields, in order, without its name."""
    return [
        (layer.op, layer.in_channels, layer.out_channels, layer.in_hw, layer.out_hw, layer.kernel)
        + (layer.dilation, layer.groups, layer.bias, layer.shift, layer.position_bias)
        for layer in network.layers
    ]


def assert_reads_as_traced(network: Network, traced: Network) -> None:
    assert layer_list(network) == layer_list(traced)
    assert network.content_hash == traced.content_hash
    assert network_cost(network) == network_cost(traced)


def attention_windows(network: Network) -> list[tuple[object, ...]]:
    return [
        (layer.in_hw, layer.kernel, layer.dilation, layer.shift, layer.groups)
        for layer in network.layers
        if layer.op is Op.ATTENTION
    ]


@pytest.fixture(scope="module")
def swin_export() -> bytes:
    return export_onnx(small_swin(), SWIN_SHAPE)


@pytest.fixture(scope="module")
def swin_v2_export() -> bytes:
    return export_onnx(small_swin(v2=True), SWIN_SHAPE)


@pytest.fixture(scope="module")
def maxvit_export() -> bytes:
    return export_onnx(small_maxvit(), MAXVIT_SHAPE)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_a_swin_export_reads_as_the_traced_module(
    v2: bool, swin_export: bytes, swin_v2_export: bytes
) -> None:
    network = network_from_onnx(swin_v2_export if v2 else swin_export)
    assert_reads_as_traced(network, network_from_module(small_swin(v2), SWIN_SHAPE))
    # Every second block shifts its windows by half a window; the map is padded to whole windows.
    assert attention_windows(network) == [
        ((10, 10), (4, 4), (1, 1), (0, 0), 2),
        ((10, 10), (4, 4), (1, 1), (2, 2), 2),
        ((5, 5), (4, 4), (1, 1), (0, 0), 4),
        ((5, 5), (4, 4), (1, 1), (2, 2), 4),
    ]
    (merging,) = [layer for layer in network.layers if layer.op is Op.SPACE_TO_DEPTH]
    assert (merging.in_hw, merging.out_hw, merging.out_channels) == ((10, 10), (5, 5), 64)


def test_a_swin_window_covering_one_axis_shifts_along_the_other_only() -> None:
    # 4 patches wide: one window covers the width, so torchvision shifts along the height only.
    shape = (2, 3, 40, 16)
    module = small_swin()
    network = network_from_onnx(export_onnx(module, shape))
    assert_reads_as_traced(network, network_from_module(module, shape))
    shifts = [layer.shift for layer in network.layers if layer.op is Op.ATTENTION]
    assert shifts == [(0, 0), (2, 0), (0, 0), (2, 0)]


def test_a_maxvit_export_reads_as_the_traced_module(maxvit_export: bytes) -> None:
    network = network_from_onnx(maxvit_export)
    assert_reads_as_traced(network, network_from_module(small_maxvit(), MAXVIT_SHAPE))
    # Window attention over 2x2 blocks, then grid attention: 2x2 positions spread over the map.
    assert attention_windows(network) == [
        ((8, 8), (2, 2), (1, 1), (0, 0), 2),
        ((8, 8), (2, 2), (4, 4), (0, 0), 2),
        ((4, 4), (2, 2), (1, 1), (0, 0), 4),
        ((4, 4), (2, 2), (2, 2), (0, 0), 4),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t", "maxvit_t"])
def test_torchvision_window_transformer_exports_have_the_layers_and_macs_of_the_torchvision_path(
    name: str,
) -> None:
    expected = network_from_torchvision(name)
    network = network_from_onnx(export_onnx(torchvision_model(name), expected.input_shape))
    assert_reads_as_traced(network, expected)


# Graphs that differ from the exported patterns in one node -----------------------------------------

SHIFTED_BLOCK = "/features/features.1/features.1.1/attn/"
GRID_ATTENTION = "/blocks.0/layers.0/layers/grid_attention/"


def _nodes(model: ModelProto, scope: str, op_type: str) -> list[onnx.NodeProto]:
    """The nodes of `op_type` whose names start with `scope`, in graph order."""
    return [node for node in model.graph.node if node.op_type == op_type and node.name.startswith(scope)]


def _set_attribute(node: onnx.NodeProto, name: str, value: object) -> None:
    (kept,) = [attr for attr in node.attribute if attr.name == name]
    node.attribute.remove(kept)
    node.attribute.append(helper.make_attribute(name, value))


def _constant_input(model: ModelProto, node: onnx.NodeProto, position: int, values: np.ndarray) -> None:
    """Replace input `position` of `node` by a new initializer holding `values`."""
    name = f"{node.name}/replaced_{position}"
    model.graph.initializer.append(numpy_helper.from_array(values, name))
    node.input[position] = name


def _softmax_over_queries(model: ModelProto) -> str:
    (softmax,) = _nodes(model, SHIFTED_BLOCK, "Softmax")
    _set_attribute(softmax, "axis", 2)
    return softmax.name


def _producers(model: ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _queries_scaled_twice(model: ModelProto) -> str:
    producers = _producers(model)
    (scores,) = [
        node
        for node in _nodes(model, SHIFTED_BLOCK, "MatMul")
        if node.input[0] in producers and producers[node.input[0]].op_type == "Mul"
    ]
    scale = producers[scores.input[0]]
    _constant_input(model, scale, 1, np.array(2 * 8**-0.5, dtype=np.float32))
    return scale.name


def _windows_in_another_order(model: ModelProto) -> str:
    # The partition's Transpose (0 1 3 2 4 5) swapped for one that keeps the rows of the windows apart.
    partition = next(
        node
        for node in _nodes(model, SHIFTED_BLOCK, "Transpose")
        if list(node.attribute[0].ints) == [0, 1, 3, 2, 4, 5]
    )
    _set_attribute(partition, "perm", [0, 3, 1, 2, 4, 5])
    return partition.name


def _rolled_back_by_another_amount(model: ModelProto) -> str:
    # The roll back along H slices x[-2:] then x[:-2]; x[-1:] then x[:-1] rolls by one position only.
    concats = [node for node in _nodes(model, SHIFTED_BLOCK, "Concat") if node.attribute[0].i == 1]
    roll_back = concats[-1]
    producers = _producers(model)
    first, second = (producers[value] for value in roll_back.input)
    _constant_input(model, first, 1, np.array([-1], dtype=np.int64))
    _constant_input(model, second, 2, np.array([-1], dtype=np.int64))
    return roll_back.name


def _weights_also_an_output(model: ModelProto) -> str:
    (softmax,) = _nodes(model, SHIFTED_BLOCK, "Softmax")
    model.graph.output.append(helper.make_empty_tensor_value_info(softmax.output[0]))
    return softmax.name


@pytest.mark.parametrize(
    "mutate",
    [
        _softmax_over_queries,
        _queries_scaled_twice,
        _windows_in_another_order,
        _rolled_back_by_another_amount,
        _weights_also_an_output,
    ],
)
def test_a_swin_attention_differing_in_one_node_is_refused_naming_it(
    swin_export: bytes, mutate: Callable[[ModelProto], str]
) -> None:
    assert_refused_naming(swin_export, mutate, "attention")


def _keys_and_queries_swapped_in_the_scores(model: ModelProto) -> str:
    einsum = _nodes(model, GRID_ATTENTION, "Einsum")[0]
    _set_attribute(einsum, "equation", "B G H I D, B G H J D -> B G H J I")
    return einsum.name


def _keys_scaled_by_the_head_size(model: ModelProto) -> str:
    producers = _producers(model)
    (scale,) = [
        node
        for node in _nodes(model, GRID_ATTENTION, "Mul")
        if node.input[0] in producers and producers[node.input[0]].op_type == "Transpose"
    ]
    _constant_input(model, scale, 1, np.array(8**-0.5, dtype=np.float32))
    return scale.name


@pytest.mark.parametrize("mutate", [_keys_and_queries_swapped_in_the_scores, _keys_scaled_by_the_head_size])
def test_a_maxvit_attention_differing_in_one_node_is_refused_naming_it(
    maxvit_export: bytes, mutate: Callable[[ModelProto], str]
) -> None:
    assert_refused_naming(maxvit_export, mutate, "attention")


def _quarter_taken_twice(model: ModelProto) -> str:
    (concat,) = [node for node in _nodes(model, "/features/features.2/", "Concat") if len(node.input) == 4]
    concat.input[3] = concat.input[0]
    return concat.name


def test_a_patch_merging_differing_in_one_node_is_refused_naming_it(swin_export: bytes) -> None:
    assert_refused_naming(swin_export, _quarter_taken_twice, "Concat")


def _departition_in_another_order(model: ModelProto) -> str:
    (departition,) = _nodes(model, GRID_ATTENTION + "departition_op/", "Transpose")
    _set_attribute(departition, "perm", [0, 5, 2, 4, 1, 3])
    return departition.name


def test_a_maxvit_departition_differing_in_one_node_is_refused_naming_it(maxvit_export: bytes) -> None:
    assert_refused_naming(maxvit_export, _departition_in_another_order, "Reshape")


def assert_refused_naming(data: bytes, mutate: Callable[[ModelProto], str], op: str) -> None:
    model = onnx.load_from_string(data)
    node = mutate(model)
    with pytest.raises(LpnetError) as refused:
        network_from_onnx(model.SerializeToString())
    assert isinstance(refused.value, UnsupportedOperator), refused.value.message
    assert refused.value.op == op
    assert f"node {node!r}" in refused.value.message
    assert LPNET_ERROR_STATUS[type(refused.value)] == 422
