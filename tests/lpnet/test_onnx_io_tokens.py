"""Whole IR networks with token sequences and patch merging, built, exported and read back.

A network traced from ViT has `tokens`, `class_token`, `position_embedding` and `token_select`
layers, one traced from Swin `space_to_depth` layers; the ONNX export of the module
`build_module` makes of each reads back to the same network. A read-out or a patch merging that
differs from the export in one node is refused naming that node.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import pytest
from onnx import ModelProto, numpy_helper

from lpnet.arch.build import build_module
from lpnet.arch.from_torch import network_from_module, network_from_torchvision
from lpnet.arch.ir import Network, Op
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.errors import UnsupportedOperator
from service.api.errors import LPNET_ERROR_STATUS
from tests.lpnet.test_onnx_io_attention import small_vit
from tests.lpnet.test_onnx_io_windows import small_swin

VIT_SHAPE = (2, 3, 32, 32)
SWIN_SHAPE = (1, 3, 20, 20)  # 5x5 patches: the patch merging pads the odd map to 6x6
TOKEN_OPS = {Op.TOKENS, Op.CLASS_TOKEN, Op.POSITION_EMBEDDING, Op.TOKEN_SELECT, Op.SPACE_TO_DEPTH}


def built_export(network: Network, dynamic_batch: bool = False) -> bytes:
    return export_onnx(build_module(network), network.input_shape, dynamic_batch=dynamic_batch)


@pytest.fixture(scope="module")
def vit() -> Network:
    return network_from_module(small_vit(), VIT_SHAPE)


@pytest.fixture(scope="module")
def swin() -> Network:
    return network_from_module(small_swin(), SWIN_SHAPE)


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_a_built_torchvision_transformer_reads_back_as_itself(name: str) -> None:
    network = network_from_torchvision(name)
    assert {layer.op for layer in network.layers} & TOKEN_OPS
    assert network_from_onnx(built_export(network)).content_hash == network.content_hash


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_built_token_layers_read_back_whatever_the_batch(
    vit: Network, swin: Network, dynamic_batch: bool
) -> None:
    for network, ops in (
        (vit, {Op.TOKENS, Op.CLASS_TOKEN, Op.POSITION_EMBEDDING, Op.TOKEN_SELECT}),
        (swin, {Op.SPACE_TO_DEPTH}),
    ):
        assert ops <= {layer.op for layer in network.layers}
        data = built_export(network, dynamic_batch)
        again = network_from_onnx(data, batch_size=network.input_shape[0])
        assert again.content_hash == network.content_hash


def _nodes(model: ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


def _second_position_read(model: ModelProto) -> tuple[str, str]:
    """The read-out takes column 1 of row 0 rather than the first position."""
    first, second = _nodes(model, "Gather")[-2:]
    index = numpy_helper.from_array(numpy_helper.to_array(_constant(model, second.input[1])) + 1, "one")
    model.graph.initializer.append(index)
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


def _constant(model: ModelProto, value: str) -> onnx.TensorProto:
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == value:
            return node.attribute[0].t
    (tensor,) = [t for t in model.graph.initializer if t.name == value]
    return tensor


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
