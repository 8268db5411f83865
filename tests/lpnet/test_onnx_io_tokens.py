"""Whole IR networks with token sequences and patch merging, built, exported and read back.

A network traced from ViT has `tokens`, `class_token`, `position_embedding` and `token_select`
layers, one traced from Swin `space_to_depth` layers; the ONNX export of the module `build_module`
makes of each reads back to the same network. A read-out, a patch merging or an unsqueeze that differs
from what the modules export is refused naming its node.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import pytest
import torch
from onnx import ModelProto, numpy_helper
from torch import nn

from lpnet.arch.build import build_module
from lpnet.arch.from_torch import network_from_module, network_from_torchvision
from lpnet.arch.ir import Layer, Network, Op
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.errors import UnsupportedOperator
from service.api.errors import LPNET_ERROR_STATUS
from tests.lpnet.test_onnx_io_attention import small_vit
from tests.lpnet.test_onnx_io_windows import small_swin

VIT_SHAPE = (2, 3, 32, 32)
SWIN_SHAPES = {
    "odd": (1, 3, 20, 20),  # 5x5 patches: the patch merging pads the map to 6x6 (`swin`)
    "even": (2, 3, 40, 40),  # 10x10 patches: nothing to pad (`even_swin`)
}
TOKEN_OPS = {Op.TOKENS, Op.CLASS_TOKEN, Op.POSITION_EMBEDDING, Op.TOKEN_SELECT}


def built_export(network: Network, dynamic_batch: bool = False) -> bytes:
    return export_onnx(build_module(network), network.input_shape, dynamic_batch=dynamic_batch)


def read_back(network: Network, dynamic_batch: bool = False) -> Network:
    return network_from_onnx(built_export(network, dynamic_batch), batch_size=network.input_shape[0])


def layer_list(network: Network) -> list[tuple[object, ...]]:
    """Every layer's operator, shapes and fields, in order, without its name."""
    return [
        (layer.op, layer.in_channels, layer.out_channels, layer.in_hw, layer.out_hw, layer.kernel)
        + (layer.stride, layer.padding, layer.groups, layer.bias, layer.shift, layer.position_bias)
        for layer in network.layers
    ]


@pytest.fixture(scope="module")
def vit() -> Network:
    return network_from_module(small_vit(), VIT_SHAPE)


@pytest.fixture(scope="module")
def swin() -> Network:
    return network_from_module(small_swin(), SWIN_SHAPES["odd"])


@pytest.fixture(scope="module")
def even_swin() -> Network:
    return network_from_module(small_swin(), SWIN_SHAPES["even"])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "ops"), [("vit_b_16", TOKEN_OPS), ("swin_t", {Op.SPACE_TO_DEPTH})])
def test_a_built_torchvision_transformer_reads_back_as_itself(name: str, ops: set[Op]) -> None:
    network = network_from_torchvision(name)
    assert ops <= {layer.op for layer in network.layers}
    again = read_back(network)
    assert layer_list(again) == layer_list(network)
    assert again.content_hash == network.content_hash


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["fixed_batch", "dynamic_batch"])
def test_built_token_layers_read_back_whatever_the_batch(vit: Network, dynamic_batch: bool) -> None:
    assert TOKEN_OPS <= {layer.op for layer in vit.layers}
    again = read_back(vit, dynamic_batch)
    assert layer_list(again) == layer_list(vit)
    assert again.content_hash == vit.content_hash
    (select,) = [layer for layer in again.layers if layer.op is Op.TOKEN_SELECT]
    assert (select.in_hw, select.out_hw, select.out_channels) == ((1, 17), (1, 1), 32)


@pytest.mark.parametrize("network_name", ["swin", "even_swin"])
@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["fixed_batch", "dynamic_batch"])
def test_a_built_patch_merging_reads_back_whatever_the_size_and_batch(
    network_name: str, dynamic_batch: bool, request: pytest.FixtureRequest
) -> None:
    swin: Network = request.getfixturevalue(network_name)
    again = read_back(swin, dynamic_batch)
    assert layer_list(again) == layer_list(swin)
    assert again.content_hash == swin.content_hash
    (merging,) = [layer for layer in again.layers if layer.op is Op.SPACE_TO_DEPTH]
    (height, width) = merging.in_hw
    assert merging.out_hw == (-(-height // 2), -(-width // 2))
    assert merging.out_channels == 4 * merging.in_channels


def merged_tokens() -> Network:
    """A 3x3 map merged to 2x2 (padded first), read as 4 tokens, a class token put before them, a
    position embedding added and the class token read out: every token op, and no attention."""
    common = {"in_channels": 32, "out_channels": 32}
    patches = {"in_channels": 3, "out_channels": 8, "kernel": (4, 4), "stride": (4, 4)}
    layers = [
        Layer(name="patches", op=Op.CONV2D, inputs=["input"], in_hw=(12, 12), out_hw=(3, 3), **patches),
        Layer(
            name="merge",
            op=Op.SPACE_TO_DEPTH,
            inputs=["patches"],
            in_channels=8,
            out_channels=32,
            in_hw=(3, 3),
            out_hw=(2, 2),
        ),
        Layer(name="tokens", op=Op.TOKENS, inputs=["merge"], in_hw=(2, 2), out_hw=(1, 4), **common),
        Layer(
            name="class_token", op=Op.CLASS_TOKEN, inputs=["tokens"], in_hw=(1, 4), out_hw=(1, 5), **common
        ),
        Layer(
            name="position",
            op=Op.POSITION_EMBEDDING,
            inputs=["class_token"],
            in_hw=(1, 5),
            out_hw=(1, 5),
            **common,
        ),
        Layer(name="select", op=Op.TOKEN_SELECT, inputs=["position"], in_hw=(1, 5), out_hw=(1, 1), **common),
    ]
    return Network(input_shape=(2, 3, 12, 12), layers=layers, outputs=["select"])


@pytest.mark.parametrize("opset", [10, 11, 13, 17, 21])
def test_built_token_and_patch_merging_layers_read_back_at_every_opset(opset: int) -> None:
    # Before opset 11 the Pad's pads and before 13 the Unsqueeze's axes are attributes; strided
    # slices need opset 10.
    network = merged_tokens()
    data = export_onnx(build_module(network), network.input_shape, opset=opset, dynamic_batch=True)
    again = network_from_onnx(data, batch_size=network.input_shape[0])
    assert [layer.op for layer in again.layers] == [layer.op for layer in network.layers]
    assert again.content_hash == network.content_hash


def padded_then_merged(hw: tuple[int, int]) -> Network:
    """A zero padding of one position on each side, then a patch merging of the padded map."""
    padded = (hw[0] + 2, hw[1] + 2)
    merged = (-(-padded[0] // 2), -(-padded[1] // 2))
    layers = [
        Layer(
            name="pad",
            op=Op.PAD,
            inputs=["input"],
            in_channels=8,
            out_channels=8,
            in_hw=hw,
            out_hw=padded,
            padding=(1, 1),
        ),
        Layer(
            name="merge",
            op=Op.SPACE_TO_DEPTH,
            inputs=["pad"],
            in_channels=8,
            out_channels=32,
            in_hw=padded,
            out_hw=merged,
        ),
    ]
    return Network(input_shape=(1, 8, *hw), layers=layers, outputs=["merge"])


@pytest.mark.parametrize("hw", [(6, 6), (5, 7)])
def test_a_pad_layer_before_a_built_patch_merging_stays_a_pad_layer(hw: tuple[int, int]) -> None:
    # On an odd map the merging pads the padded map again, at its end; on an even one it does not.
    network = padded_then_merged(hw)
    again = read_back(network)
    assert [(layer.op, layer.in_hw, layer.out_hw) for layer in again.layers] == [
        (layer.op, layer.in_hw, layer.out_hw) for layer in network.layers
    ]
    assert again.content_hash == network.content_hash


# Exports that differ from the modules' in one node ------------------------------------------------


def _nodes(model: ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


def _constant(model: ModelProto, value: str) -> onnx.TensorProto:
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == value:
            return node.attribute[0].t
    (tensor,) = [t for t in model.graph.initializer if t.name == value]
    return tensor


def _second_position_read(model: ModelProto) -> tuple[str, str]:
    """The read-out takes column 1 of row 0 rather than the first position."""
    first, second = _nodes(model, "Gather")[-2:]
    index = numpy_helper.to_array(_constant(model, second.input[1])) + 1
    model.graph.initializer.append(numpy_helper.from_array(index, "one"))
    second.input[1] = "one"
    return first.name, second.name


def _quarters_swapped(model: ModelProto) -> tuple[str, str]:
    """The patch merging stacks the quarters (1, 0) and (0, 1) the other way round."""
    slices = {node.output[0] for node in _nodes(model, "Slice")}
    (concat,) = [
        node for node in _nodes(model, "Concat") if len(node.input) == 4 and slices >= set(node.input)
    ]
    concat.input[1], concat.input[2] = concat.input[2], concat.input[1]
    return concat.name, concat.name


@pytest.mark.parametrize(
    ("network_name", "tamper", "op"),
    [("vit", _second_position_read, "Gather"), ("swin", _quarters_swapped, "Concat")],
)
def test_a_built_export_differing_in_one_node_is_refused_naming_it(
    network_name: str,
    tamper: Callable[[ModelProto], tuple[str, str]],
    op: str,
    request: pytest.FixtureRequest,
) -> None:
    network: Network = request.getfixturevalue(network_name)
    model = onnx.load_from_string(built_export(network))
    start, changed = tamper(model)
    with pytest.raises(UnsupportedOperator) as refused:
        network_from_onnx(model.SerializeToString(), batch_size=network.input_shape[0])
    assert (refused.value.op, refused.value.layer) == (op, start)
    assert f"does not match at node {changed!r}" in refused.value.message
    assert LPNET_ERROR_STATUS[type(refused.value)] == 422


class PositionsAsChannels(nn.Module):
    """The positions of a map as a new axis 1, (N, 1, C, H*W): not a token sequence's map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).unsqueeze(1)


def test_an_unsqueeze_that_does_not_make_the_token_map_is_refused_naming_it() -> None:
    model = onnx.load_from_string(export_onnx(PositionsAsChannels(), (1, 3, 4, 4)))
    (unsqueeze,) = _nodes(model, "Unsqueeze")
    with pytest.raises(UnsupportedOperator) as refused:
        network_from_onnx(model.SerializeToString())
    assert (refused.value.op, refused.value.layer) == ("Unsqueeze", unsqueeze.name)
    assert "axis 2 of a (N, C, L) token sequence" in refused.value.message
    assert LPNET_ERROR_STATUS[type(refused.value)] == 422
