"""Token sequences, as ViT computes on them: a map read as its positions, a class token put before
them, a learned position embedding added, and the class token read out.

A (N, C, H, W) map reshaped to (N, C, H*W) is the IR's `tokens` layer, its output the (N, C, 1, H*W)
map; transposed to (N, L, C) it is the same tensor channels-last, which layer norms, linears (1x1
convolutions), activations, adds and attention compute on. The IR's own modules keep the sequence
channels first: their `tokens` is that reshape and an Unsqueeze of axis 2 (`views.unsqueeze`), their
class token a Concat of a constant (N, C, 1, 1) before the (N, C, 1, L) map along its last axis,
their position embedding an Add of a (1, C, H, W) constant, and their read-out x[:, :, 0, 0] two
Gathers (`match_token_select`).
"""

from __future__ import annotations

from functools import partial

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion
from lpnet.arch.onnx_io.nodes import Attributes, constant_number, node_name, node_scope
from lpnet.arch.onnx_io.subgraphs import GraphIndex, Subgraph, SubgraphWalk
from lpnet.errors import UnsupportedOperator

# What a Gather of a map along its rows is read as.
TOKEN_SELECT = "a Gather of a map along its rows is read only as the read-out of its first position"


def _is_sequence(state: Conversion, value: str, node: onnx.NodeProto) -> bool:
    """Whether `value` is a (N, L, C) token sequence: a channels-last IR tensor of rank 3."""
    return value in state.channels_last and len(state.shape(value, node)) == 3


def _is_map(state: Conversion, value: str, node: onnx.NodeProto) -> bool:
    """Whether `value` is an IR map in its own (N, C, H, W) layout."""
    return value in state.alias and not state.is_permuted(value) and len(state.shape(value, node)) == 4


def convert_tokens(
    state: Conversion, node: onnx.NodeProto, attrs: Attributes, inputs: list[str], data_inputs: list[str]
) -> bool:
    """A class token, a position embedding or the read-out of the class token; False for other nodes."""
    if len(data_inputs) != 1 or len(inputs) != 2:
        return False
    (source,) = data_inputs
    constant = next(v for v in inputs if v != source)
    if constant not in state.constants:
        return False
    dims = tuple(state.constants[constant].dims)
    if _is_sequence(state, source, node):
        return _convert_sequence(state, node, attrs, inputs, source, dims)
    if _is_map(state, source, node):
        return _convert_map(state, node, attrs, inputs, source, dims)
    return False


def _convert_sequence(
    state: Conversion,
    node: onnx.NodeProto,
    attrs: Attributes,
    inputs: list[str],
    source: str,
    dims: tuple[int, ...],
) -> bool:
    """A class token, position embedding or read-out of a channels-last (N, L, C) sequence."""
    n, length, channels = state.shape(source, node)
    in_shape = state.ir_layer_shape(source, node)
    where, out = node_name(node), node.output[0]
    if node.op_type == "Concat" and inputs[1] == source and attrs.get_int("axis", 0) % 3 == 1:
        if dims[1:] != (1, channels) or dims[0] not in (1, n):
            return False
        out_shape = (n, channels, 1, length + 1)
        state.alias[out] = state.add_layer(
            where, Op.CLASS_TOKEN, [state.alias[source]], in_shape, out_shape, {}
        )
        state.channels_last.add(out)
        return True
    if node.op_type == "Add" and dims == (1, length, channels):
        state.add_same_shape_layer(node, Op.POSITION_EMBEDDING, source)
        return True
    if node.op_type == "Gather" and inputs[0] == source and attrs.get_int("axis", 0) % 3 == 1 and dims == ():
        if constant_number(state.constants[inputs[1]], attrs) != 0:
            return False
        state.alias[out] = state.add_layer(
            where, Op.TOKEN_SELECT, [state.alias[source]], in_shape, (n, channels), {}
        )
        return True
    return False


def _convert_map(
    state: Conversion,
    node: onnx.NodeProto,
    attrs: Attributes,
    inputs: list[str],
    source: str,
    dims: tuple[int, ...],
) -> bool:
    """A class token put before the positions of an (N, C, 1, L) map, or a position embedding added
    to an (N, C, H, W) map."""
    n, channels, height, width = state.shape(source, node)
    if node.op_type == "Concat" and inputs[1] == source and attrs.get_int("axis", 0) % 4 == 3:
        if height != 1 or dims[1:] != (channels, 1, 1) or dims[0] not in (1, n):
            return False
        out_shape = (n, channels, 1, width + 1)
        state.alias[node.output[0]] = state.add_layer(
            node_name(node), Op.CLASS_TOKEN, [state.alias[source]], (n, channels, 1, width), out_shape, {}
        )
        return True
    if node.op_type == "Add" and dims == (1, channels, height, width):
        state.add_same_shape_layer(node, Op.POSITION_EMBEDDING, source)
        return True
    return False


def match_token_select(state: Conversion, index: GraphIndex, first: int) -> Subgraph:
    """x[:, :, 0, 0] of an (N, C, H, W) map as torch.onnx.export writes it, from its first node: a
    Gather of row 0 (N, C, W), then a Gather of column 0 (N, C); a Mismatch naming the node that differs."""
    walk = SubgraphWalk(state, index, first, "read-out of the first position")
    rows = walk.start
    source = rows.input[0]
    shape = state.shapes.get(source, ())
    if len(shape) != 4:
        walk.refuse(rows, f"expected a Gather of an (N, C, H, W) map, got {shape}")
    n, channels, _, width = shape
    _first_index(walk, rows, 4)
    walk.shape(rows, (n, channels, width))
    columns = walk.consumer(rows, {"Gather"})
    _first_index(walk, columns, 3)
    walk.shape(columns, (n, channels))
    return walk.close(source, columns, partial(_add_token_select, source=source))


def _first_index(walk: SubgraphWalk, gather: onnx.NodeProto, rank: int) -> None:
    """`gather` takes index 0 of axis 2 of its input (of `rank` dimensions)."""
    if walk.attribute(gather, "axis", 0) % rank != 2 or len(gather.input) != 2:
        walk.refuse(gather, "expected a Gather along axis 2")
    walk.constant(gather, gather.input[1], ())
    position = walk.number(gather, gather.input[1])
    if position != 0:
        walk.refuse(gather, f"expected index 0, got {position:g}")


def _add_token_select(state: Conversion, node: onnx.NodeProto, source: str) -> None:
    """The `token_select` layer of a matched read-out of the map `source`, made at its last node."""
    if not _is_map(state, source, node):
        raise UnsupportedOperator(
            Op.TOKEN_SELECT.value, node_scope(node), f"its input {source!r} must be an (N, C, H, W) map"
        )
    in_shape = state.layer_shape(source, node)
    state.alias[node.output[0]] = state.add_layer(
        node_scope(node), Op.TOKEN_SELECT, [state.alias[source]], in_shape, in_shape[:2], {}
    )
