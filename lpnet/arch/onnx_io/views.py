"""Operators that move data: transposes, reshapes and unsqueezes (channel shuffles, channels-last
permutes, token sequences, flattens), and concatenations, splits and slices of channels."""

from __future__ import annotations

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion, LayerSpec
from lpnet.arch.onnx_io.nodes import Attributes, node_name
from lpnet.errors import UnsupportedOperator

_TO_CHANNELS_LAST = (0, 2, 3, 1)
_TO_CHANNELS_FIRST = (0, 3, 1, 2)
_SWAP_CHANNEL_GROUPS = (0, 2, 1, 3, 4)
# Channels swapped with W: how exporters before opset 13 put the channels last for a Softmax.
_SWAP_CHANNELS_AND_WIDTH = (0, 3, 2, 1)
_SWAP_TOKENS_AND_CHANNELS = (0, 2, 1)


def transpose(state: Conversion, node: onnx.NodeProto, attrs: Attributes, source: str) -> bool:
    """A transpose of a channel shuffle's 5-D view, to or from channels last, or swapping C and W."""
    out = node.output[0]
    rank = len(state.shape(source, node))
    perm = tuple(attrs.get_axes("perm")) if "perm" in attrs else tuple(range(rank))[::-1]
    if source in state.partitions:
        raise UnsupportedOperator(
            node.op_type, attrs.where, "a MaxViT partition is only read back into its map by its departition"
        )
    if source in state.grouped and perm == _SWAP_CHANNEL_GROUPS:
        tensor, groups, transposed = state.grouped[source]
        state.grouped[out] = (tensor, groups, not transposed)
    elif source in state.alias and rank == 4 and not state.is_permuted(source) and perm == _TO_CHANNELS_LAST:
        state.alias[out] = state.alias[source]
        state.channels_last.add(out)
    elif source in state.channels_last and perm == _TO_CHANNELS_FIRST:
        state.alias[out] = state.alias[source]
    elif source in state.alias and rank == 3 and perm == _SWAP_TOKENS_AND_CHANNELS:
        # (N, C, L) <-> (N, L, C): a token sequence's positions put before or after its channels.
        state.alias[out] = state.alias[source]
        if source not in state.channels_last:
            state.channels_last.add(out)
    elif source in state.alias and rank == 4 and perm == _SWAP_CHANNELS_AND_WIDTH:
        if source in state.channels_last:
            raise UnsupportedOperator(node.op_type, attrs.where, "a transpose of a channels-last tensor")
        state.alias[out] = state.alias[source]
        if source not in state.channels_swapped:
            state.channels_swapped.add(out)
    elif perm == tuple(range(rank)):
        state.view(out, source)
    else:
        raise UnsupportedOperator(
            node.op_type,
            attrs.where,
            "only (N, C, H, W) <-> (N, H, W, C) transposes and channel shuffles are supported, "
            f"got perm {list(perm)}",
        )
    return True


def reshape(state: Conversion, node: onnx.NodeProto, attrs: Attributes, source: str) -> bool:
    """Reshapes of a channel shuffle, of a map to its positions, or keeping the shape; False for a flatten."""
    out = node.output[0]
    if source in state.grouped:
        tensor, groups, transposed = state.grouped[source]
        out_shape = state.layer_shape(out, node)
        if len(out_shape) != 4:
            raise UnsupportedOperator(
                node.op_type, attrs.where, "a 5-D view of the channels must be reshaped back to (N, C, H, W)"
            )
        if not transposed:
            state.alias[out] = tensor
        else:
            state.alias[out] = state.add_layer(
                attrs.where, Op.CHANNEL_SHUFFLE, [tensor], out_shape, out_shape, {"groups": groups}
            )
        return True
    if state.is_permuted(source):
        return False
    in_shape, out_shape = state.shape(source, node), state.shape(out, node)
    if in_shape == out_shape:
        state.view(out, source)
        return True
    if len(in_shape) == 4:
        n, c, h, w = in_shape
        if (
            len(out_shape) == 5
            and out_shape[0] == n
            and out_shape[3:] == (h, w)
            and out_shape[1] * out_shape[2] == c
        ):
            state.grouped[out] = (state.alias[source], out_shape[1], False)
            return True
        if out_shape == (n, c, h * w):  # the sequence of the map's positions (ViT's patches)
            tokens = (n, c, 1, h * w)
            state.alias[out] = state.add_layer(
                attrs.where, Op.TOKENS, [state.alias[source]], in_shape, tokens, {}
            )
            return True
    if len(out_shape) != 2:
        raise UnsupportedOperator(
            node.op_type,
            attrs.where,
            f"only a flatten or the reshapes of a channel shuffle are supported, got {in_shape} -> {out_shape}",
        )
    return False


def unsqueeze(state: Conversion, node: onnx.NodeProto, attrs: Attributes, source: str) -> bool:
    """A (N, C, L) token sequence given the axis 2 of its (N, C, 1, L) map: the map itself."""
    if "axes" in attrs:  # before opset 13
        axes = attrs.get_axes("axes")
    else:
        axes = tuple(int(v) for v in state.constant_input(node, attrs, 1, "axes").ravel())
    shape = state.shape(source, node)
    sequence = source in state.alias and not state.is_permuted(source) and len(shape) == 3
    if not sequence or axes not in ((2,), (-2,)):
        raise UnsupportedOperator(
            node.op_type,
            attrs.where,
            "only an Unsqueeze of axis 2 of a (N, C, L) token sequence, its (N, C, 1, L) map, is "
            f"supported, got axes {list(axes)} of {shape}",
        )
    state.alias[node.output[0]] = state.alias[source]
    return True


def flatten(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    """Flatten from axis 1, or a Reshape to (N, F)."""
    if node.op_type == "Flatten" and attrs.get_int("axis", 1) != 1:
        raise UnsupportedOperator("Flatten", attrs.where, "only axis=1 is supported")
    if node.op_type == "Reshape" and len(state.shape(node.output[0], node)) != 2:
        raise UnsupportedOperator(node.op_type, attrs.where)
    return LayerSpec(Op.FLATTEN, data_inputs)


def concat(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    axis = attrs.get_int("axis", 0)
    if axis != 1:
        raise UnsupportedOperator("Concat", attrs.where, f"only axis=1 is supported, got {axis}")
    in_channels = sum(state.layer_shape(v, node)[1] for v in data_inputs)
    return LayerSpec(Op.CONCAT, data_inputs, {"in_channels": in_channels})


def split(state: Conversion, node: onnx.NodeProto, attrs: Attributes, source: str) -> bool:
    """A split along channels: one slice layer per output that is used."""
    where = node_name(node)
    shape = state.layer_shape(source, node)
    axis = attrs.get_int("axis", 0)
    if len(shape) != 4 or axis % 4 != 1:
        raise UnsupportedOperator(
            "Split", where, f"only a split along channels (axis 1) is supported, got axis {axis}"
        )
    offset = 0
    for index, out in enumerate(node.output):
        out_shape = state.layer_shape(out, node) if out else shape
        if out:
            state.alias[out] = state.add_layer(
                f"{where}:{index}",
                Op.SLICE,
                [state.alias[source]],
                shape,
                out_shape,
                {"channel_offset": offset},
            )
        offset += out_shape[1]
    return True


def slice_channels(
    state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]
) -> LayerSpec:
    """A Slice of a contiguous range of channels; anything else is refused."""
    in_shape = state.layer_shape(data_inputs[0], node)
    out_shape = state.layer_shape(node.output[0], node)
    arguments = state.slice_arguments(node, attrs)
    starts, axes, steps = arguments.starts, arguments.axes, arguments.steps
    rank = len(in_shape)
    channel_axes = [i for i, axis in enumerate(axes) if axis % rank == 1]
    only_channels = in_shape[0] == out_shape[0] and in_shape[2:] == out_shape[2:]
    if len(channel_axes) != 1 or not only_channels or steps[channel_axes[0]] != 1:
        raise UnsupportedOperator(
            "Slice",
            attrs.where,
            f"only a contiguous slice of the channels is supported, got {in_shape} -> {out_shape}",
        )
    start = starts[channel_axes[0]]
    start = start + in_shape[1] if start < 0 else start
    return LayerSpec(Op.SLICE, data_inputs, {"channel_offset": min(max(start, 0), in_shape[1])})
