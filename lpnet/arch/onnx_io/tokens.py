"""Token sequences, as ViT computes on them: a map read as its positions, a class token put before
them, a learned position embedding added, and the class token read out.

A (N, C, H, W) map reshaped to (N, C, H*W) is the IR's `tokens` layer, its output the (N, C, 1, H*W)
map; transposed to (N, L, C) it is the same tensor channels-last, which layer norms, linears (1x1
convolutions), activations, adds and attention compute on.
"""

from __future__ import annotations

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion
from lpnet.arch.onnx_io.nodes import Attributes, constant_number, node_name


def _is_sequence(state: Conversion, value: str, node: onnx.NodeProto) -> bool:
    """Whether `value` is a (N, L, C) token sequence: a channels-last IR tensor of rank 3."""
    return value in state.channels_last and len(state.shape(value, node)) == 3


def convert_tokens(
    state: Conversion, node: onnx.NodeProto, attrs: Attributes, inputs: list[str], data_inputs: list[str]
) -> bool:
    """A class token, a position embedding or the read-out of the class token; False for other nodes."""
    if len(data_inputs) != 1 or len(inputs) != 2 or not _is_sequence(state, data_inputs[0], node):
        return False
    (source,) = data_inputs
    constant = next(v for v in inputs if v != source)
    if constant not in state.constants:
        return False
    dims = tuple(state.constants[constant].dims)
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
        if constant_number(state.constants[constant], attrs) != 0:
            return False
        state.alias[out] = state.add_layer(
            where, Op.TOKEN_SELECT, [state.alias[source]], in_shape, (n, channels), {}
        )
        return True
    return False
