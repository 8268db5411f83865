"""Element-wise operators: activations (GELU and SiLU as exporters decompose them too), relu6 as a
Clip, and the adds and multiplications of tensors (adds of channels-last ones too)."""

# ruff: noqa: ARG001 - every layer rule takes the arguments of LayerRule, whether it reads them or not

from __future__ import annotations

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion, LayerSpec
from lpnet.arch.onnx_io.limits import numel
from lpnet.arch.onnx_io.nodes import Attributes, constant_number, node_name
from lpnet.errors import UnsupportedOperator

ACTIVATIONS: dict[str, Op] = {
    "Relu": Op.RELU,
    "Sigmoid": Op.SIGMOID,
    "Tanh": Op.TANH,
    "HardSwish": Op.HARDSWISH,
    "HardSigmoid": Op.HARDSIGMOID,
    "Gelu": Op.GELU,
}
# x * gate(x) is the activation on the right: SiLU as exporters write it, and HardSwish before opset 14.
GATED: dict[Op, Op] = {Op.SIGMOID: Op.SILU, Op.HARDSIGMOID: Op.HARDSWISH}
# GELU as exporters write it before opset 20: x * ((erf(x / sqrt(2)) + 1) * 0.5), in any operand order.
# Each step is (operator, the constant operand it takes, or None for the Mul by x itself).
_GELU_STEPS: tuple[tuple[str, float | None], ...] = (
    ("Div", 2**0.5),
    ("Erf", None),
    ("Add", 1.0),
    ("Mul", None),
    ("Mul", 0.5),
)
GELU_OPS = frozenset(op_type for op_type, _ in _GELU_STEPS)


def activation(
    state: Conversion,
    node: onnx.NodeProto,
    attrs: Attributes,
    data_inputs: list[str],
) -> LayerSpec:
    return LayerSpec(ACTIVATIONS[node.op_type], data_inputs)


def relu6(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    """Clip(0, 6), the bounds attributes before opset 11 and constant inputs from 11."""
    if "min" in attrs or "max" in attrs:
        low, high = attrs.get_float("min", float("-inf")), attrs.get_float("max", float("inf"))
    else:
        bounds = []
        for i, default in ((1, float("-inf")), (2, float("inf"))):
            if len(node.input) > i and node.input[i]:
                if node.input[i] not in state.constants:
                    raise UnsupportedOperator("Clip", attrs.where, "clip bounds must be constants")
                bounds.append(constant_number(state.constants[node.input[i]], attrs))
            else:
                bounds.append(default)
        low, high = bounds
    if (low, high) != (0.0, 6.0):
        raise UnsupportedOperator(
            "Clip", attrs.where, f"only Clip(0, 6) (relu6) is supported, got ({low}, {high})"
        )
    return LayerSpec(Op.RELU6, data_inputs)


def add_or_mul(
    state: Conversion,
    node: onnx.NodeProto,
    attrs: Attributes,
    data_inputs: list[str],
) -> LayerSpec:
    """Add, Sum or Mul of tensors, the largest first; x * gate(x) is the gated activation of x."""
    op = Op.MUL if node.op_type == "Mul" else Op.ADD
    tensors = sorted(data_inputs, key=lambda v: -numel(state.shape(v, node)))
    if op is Op.MUL and len(tensors) == 2:
        for source, gate in (tensors, tensors[::-1]):
            gated = _gated(state, gate, source)
            if gated is not None:
                return LayerSpec(gated, [source])
    return LayerSpec(op, tensors)


def _gated(state: Conversion, gate: str, source: str) -> Op | None:
    """The activation `source * gate` computes when `gate` is a gate layer of `source`, else None."""
    layer = state.layer_by_name.get(state.alias[gate])
    if layer is None or layer.op not in GATED or layer.inputs != [state.alias[source]]:
        return None
    return GATED[layer.op]


def convert_channels_last_activation(state: Conversion, node: onnx.NodeProto, data_inputs: list[str]) -> bool:
    """An activation of a channels-last tensor, which keeps its layout."""
    if node.op_type not in ACTIVATIONS or data_inputs[0] not in state.channels_last:
        return False
    state.add_same_shape_layer(node, ACTIVATIONS[node.op_type], data_inputs[0])
    return True


def convert_channels_last_add(
    state: Conversion, node: onnx.NodeProto, inputs: list[str], data_inputs: list[str]
) -> bool:
    """An Add or Sum of channels-last tensors of one shape and layout (a residual of a transformer block)."""
    if node.op_type not in ("Add", "Sum") or len(data_inputs) < 2 or len(data_inputs) != len(inputs):
        return False
    if any(value not in state.channels_last for value in data_inputs):
        return False
    if len({(state.shape(value, node), state.partitions.get(value)) for value in data_inputs}) != 1:
        return False
    shape = state.ir_layer_shape(data_inputs[0], node)
    refs = [state.alias[value] for value in data_inputs]
    out = node.output[0]
    state.alias[out] = state.add_layer(node_name(node), Op.ADD, refs, shape, shape, {})
    state.keep_layout(out, data_inputs[0])
    return True


def convert_gelu(
    state: Conversion, node: onnx.NodeProto, attrs: Attributes, inputs: list[str], data_inputs: list[str]
) -> bool:
    """A step of a decomposed GELU, its last step making the layer; a partial GELU used otherwise is refused."""
    step = _gelu_step(state, node, attrs, inputs, data_inputs)
    if step is not None:
        source, done = step
        if done < len(_GELU_STEPS):
            state.gelu[node.output[0]] = (source, done)
        else:
            state.add_same_shape_layer(node, Op.GELU, source)
        return True
    where = node_name(node)
    for value in data_inputs:
        if value in state.gelu:
            raise UnsupportedOperator(
                node.op_type, where, f"its input {value!r} is part of a GELU; only a whole GELU is supported"
            )
    if node.op_type == "Erf":
        raise UnsupportedOperator("Erf", where, "Erf is only supported as part of a GELU")
    return False


def _gelu_step(
    state: Conversion, node: onnx.NodeProto, attrs: Attributes, inputs: list[str], data_inputs: list[str]
) -> tuple[str, int] | None:
    """(the GELU's input, steps done) when `node` is the next step of a decomposed GELU, else None."""
    op_type = node.op_type
    if op_type not in GELU_OPS or not 1 <= len(data_inputs) <= 2:
        return None
    partial = [v for v in data_inputs if v in state.gelu]
    if len(partial) != 1:
        if op_type == "Div" and len(data_inputs) == 1 and inputs[0] == data_inputs[0]:
            source = data_inputs[0]
            if source in state.alias and _constant_operand_is(state, inputs[1], _GELU_STEPS[0][1], attrs):
                return source, 1
        return None
    (value,) = partial
    source, done = state.gelu[value]
    if done >= len(_GELU_STEPS) or _GELU_STEPS[done][0] != op_type:
        return None
    expected = _GELU_STEPS[done][1]
    others = [v for v in inputs if v != value]
    if expected is None:
        if op_type == "Erf" or others == [source]:
            return source, done + 1
        return None
    if len(others) == 1 and _constant_operand_is(state, others[0], expected, attrs):
        return source, done + 1
    return None


def _constant_operand_is(state: Conversion, value: str, expected: float | None, attrs: Attributes) -> bool:
    if expected is None or value not in state.constants or numel(tuple(state.constants[value].dims)) != 1:
        return False
    return abs(constant_number(state.constants[value], attrs) - expected) < 1e-3
