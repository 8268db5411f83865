"""Normalisations over the channels: batch norm, layer norm, local response norm and softmax."""

# ruff: noqa: ARG001 - every layer rule takes the arguments of LayerRule, whether it reads them or not

from __future__ import annotations

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion, LayerSpec
from lpnet.arch.onnx_io.nodes import Attributes
from lpnet.errors import UnsupportedOperator


def batch_norm(
    state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]
) -> LayerSpec:
    if attrs.get_int("spatial", 1) != 1:
        raise UnsupportedOperator(
            node.op_type,
            attrs.where,
            f"spatial=0 (one statistic per activation, opset {state.opset}) is not supported",
        )
    return LayerSpec(Op.BATCHNORM2D, data_inputs)


def lrn(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    return LayerSpec(Op.LRN, data_inputs, {"kernel": (attrs.get_int("size", 0), 1)})


def softmax(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    """A softmax over the channels of an (N, C, H, W) or (N, F) tensor."""
    shape = state.layer_shape(data_inputs[0], node)
    axis = _softmax_axis(state, attrs) % len(shape)
    # Before opset 13 a softmax runs over all axes from `axis` on: over channels only when H = W = 1.
    over_channels = axis == 1 and (state.opset >= 13 or len(shape) == 2 or shape[2:] == (1, 1))
    if not over_channels:
        raise UnsupportedOperator(
            "Softmax",
            attrs.where,
            f"only a softmax over channels (axis 1) is supported, got axis {attrs.get_int('axis', -1)} "
            f"of {shape} at opset {state.opset}",
        )
    return LayerSpec(Op.SOFTMAX, data_inputs)


def softmax_of_swapped(state: Conversion, node: onnx.NodeProto, attrs: Attributes, source: str) -> bool:
    """A softmax over the last axis of a tensor with its channels swapped with W; False for other inputs."""
    if source not in state.channels_swapped:
        return False
    shape = state.shape(source, node)
    if _softmax_axis(state, attrs) % 4 != 3:
        raise UnsupportedOperator(
            node.op_type,
            attrs.where,
            "a softmax of a tensor with its channels last must run over the last axis",
        )
    swapped_back = (shape[0], shape[3], shape[2], shape[1])
    out = node.output[0]
    state.alias[out] = state.add_layer(
        attrs.where, Op.SOFTMAX, [state.alias[source]], swapped_back, swapped_back, {}
    )
    state.channels_swapped.add(out)
    return True


def layer_norm(state: Conversion, node: onnx.NodeProto, attrs: Attributes, source: str) -> bool:
    """A layer norm over the channels of a channels-last map or token sequence, or of (N, F) features."""
    shape = state.shape(source, node)
    axis = attrs.get_int("axis", -1) % max(len(shape), 1)
    channels_last = source in state.channels_last and axis == len(shape) - 1
    if not (channels_last or (len(shape) == 2 and source not in state.grouped and axis == 1)):
        raise UnsupportedOperator(
            node.op_type,
            attrs.where,
            f"only a layer normalisation over the channels (of a channels-last map or token sequence, or "
            f"of (N, F) features) is supported, got axis {attrs.get_int('axis', -1)} of {shape}",
        )
    state.add_same_shape_layer(node, Op.LAYERNORM, source)
    return True


def _softmax_axis(state: Conversion, attrs: Attributes) -> int:
    """The axis attribute of a Softmax, whose default is 1 before opset 13 and -1 from 13."""
    return attrs.get_int("axis", -1 if state.opset >= 13 else 1)
