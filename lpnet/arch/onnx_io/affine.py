"""Products with weights: Gemm and MatMul as linear layers (1x1 convolutions over a channels-last map),
the Add of their bias, and per-channel scales."""

# ruff: noqa: ARG001 - every layer rule takes the arguments of LayerRule, whether it reads them or not

from __future__ import annotations

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion, LayerSpec
from lpnet.arch.onnx_io.nodes import Attributes, node_name
from lpnet.errors import UnsupportedOperator


def gemm(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    """Gemm as exported for nn.Linear."""
    if attrs.get_int("transA", 0) or not attrs.get_int("transB", 0):
        raise UnsupportedOperator(
            "Gemm", attrs.where, "only Gemm(transA=0, transB=1) as exported for nn.Linear"
        )
    if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
        raise UnsupportedOperator("Gemm", attrs.where, "only alpha=beta=1 is supported")
    return LayerSpec(Op.LINEAR, data_inputs, {"bias": len(node.input) > 2 and bool(node.input[2])})


def convert_affine(
    state: Conversion, node: onnx.NodeProto, inputs: list[str], data_inputs: list[str]
) -> bool:
    """A MatMul by a weight, the Add of its bias, or a Mul by one factor per channel (a layer scale)."""
    if len(inputs) != 2 or len(data_inputs) != 1:
        return False
    (source,) = data_inputs
    constant = next(v for v in inputs if v != source)
    if constant not in state.constants:
        return False
    dims = tuple(state.constants[constant].dims)
    op_type, out = node.op_type, node.output[0]
    if op_type == "MatMul" and inputs[0] == source and len(dims) == 2:
        shape = state.shape(source, node)
        if source in state.channels_last or len(shape) == 2:
            op = Op.CONV2D if source in state.channels_last else Op.LINEAR
            in_shape = state.ir_layer_shape(source, node)
            out_shape = (in_shape[0], dims[1], *in_shape[2:])
            name = state.add_layer(node_name(node), op, [state.alias[source]], in_shape, out_shape, {})
            state.alias[out] = name
            state.keep_layout(out, source)
            if state.consumers[out] == 1:
                state.biasable[out] = name
            return True
    per_channel = _per_channel(state, source, dims, node)
    if op_type == "Add" and source in state.biasable and per_channel:
        name = state.biasable.pop(source)
        layer = state.layer_by_name[name].model_copy(update={"bias": True})
        state.layers[state.layers.index(state.layer_by_name[name])] = layer
        state.layer_by_name[name] = layer
        state.view(out, source)
        return True
    if op_type == "Mul" and per_channel:
        state.add_same_shape_layer(node, Op.BATCHNORM2D, source)
        return True
    return False


def _per_channel(state: Conversion, source: str, dims: tuple[int, ...], node: onnx.NodeProto) -> bool:
    """A constant of `dims` broadcasts one value per channel over `source`."""
    if source not in state.alias:
        return False
    if source in state.channels_last:
        channels = state.ir_layer_shape(source, node)[1]
        return dims in ((channels,), (1, 1, 1, channels))
    shape = state.shape(source, node)  # a map, features, or a (N, C, L) token sequence
    return len(shape) == 4 and dims in ((shape[1], 1, 1), (1, shape[1], 1, 1))
