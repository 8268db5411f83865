"""Layers with a window over H and W: convolutions, pooling (means over H and W too), zero padding and
resizing."""

# ruff: noqa: ARG001 - every layer rule takes the arguments of LayerRule, whether it reads them or not

from __future__ import annotations

from typing import Any

import onnx

from lpnet.arch.ir import Op, conv_output_hw
from lpnet.arch.onnx_io.conversion import Conversion, LayerSpec, hw
from lpnet.arch.onnx_io.limits import MAX_RANK
from lpnet.arch.onnx_io.nodes import Attributes, constant_values, node_name
from lpnet.errors import UnsupportedOperator

_RESIZE_MODES = {
    "nearest": Op.UPSAMPLE_NEAREST,
    "linear": Op.UPSAMPLE_BILINEAR,
    "bilinear": Op.UPSAMPLE_BILINEAR,
}


def conv(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    fields = _window_fields(attrs)
    _require_symmetric(fields, attrs)
    fields["groups"] = attrs.get_int("group", 1)
    fields["bias"] = len(node.input) > 2 and bool(node.input[2])
    return LayerSpec(Op.CONV2D, data_inputs, fields)


def pool(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    """MaxPool or AveragePool."""
    op = Op.MAXPOOL2D if node.op_type == "MaxPool" else Op.AVGPOOL2D
    fields = _window_fields(attrs)
    fields["ceil_mode"] = bool(attrs.get_int("ceil_mode", 0))
    if op is Op.MAXPOOL2D and not fields["ceil_mode"] and fields["end_padding"] != fields["padding"]:
        # MaxPool has no ceil_mode before opset 10: exporters pad the end instead, which gives the
        # same windows and, for a maximum, the same values.
        in_hw = hw(state.layer_shape(node.input[0], node), attrs.where)
        out_hw = hw(state.layer_shape(node.output[0], node), attrs.where)
        window = (fields["kernel"], fields["stride"], fields["padding"], fields["dilation"])
        if conv_output_hw(in_hw, *window, ceil_mode=True) == out_hw:
            fields["ceil_mode"] = True
            fields["end_padding"] = fields["padding"]
    _require_symmetric(fields, attrs)
    if op is Op.AVGPOOL2D:
        fields.pop("dilation")
    return LayerSpec(op, data_inputs, fields)


def global_pool(
    state: Conversion,
    node: onnx.NodeProto,
    attrs: Attributes,
    data_inputs: list[str],
) -> LayerSpec:
    return LayerSpec(Op.ADAPTIVE_AVGPOOL2D, data_inputs)


def pad(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    """A zero Pad of H and W, the same on both sides of each."""
    mode = attrs.get_string("mode", "constant")
    if "pads" in attrs:  # before opset 11
        pads = tuple(attrs.by_name["pads"].ints)
        value = attrs.get_float("value", 0.0)
    else:
        pads = tuple(int(v) for v in state.constant_input(node, attrs, 1, "pads").ravel())
        has_value = len(node.input) > 2 and bool(node.input[2])
        value = float(state.constant_input(node, attrs, 2, "constant_value").ravel()[0]) if has_value else 0.0
        if len(node.input) > 3 and node.input[3]:
            raise UnsupportedOperator(
                "Pad", attrs.where, "the axes input is not supported; pad all four axes"
            )
    if mode != "constant" or value != 0.0:
        raise UnsupportedOperator(
            "Pad", attrs.where, f"only zero padding is supported, got mode={mode!r} value={value}"
        )
    if len(pads) != 8 or pads[:2] != (0, 0) or pads[4:6] != (0, 0) or pads[2:4] != pads[6:8] or min(pads) < 0:
        raise UnsupportedOperator(
            "Pad",
            attrs.where,
            f"only the same padding on both sides of H and W is supported, got pads {list(pads)}",
        )
    return LayerSpec(Op.PAD, data_inputs, {"padding": (pads[2], pads[3])})


def resize(state: Conversion, node: onnx.NodeProto, attrs: Attributes, data_inputs: list[str]) -> LayerSpec:
    """Resize or Upsample by an integer factor of H and W."""
    where = attrs.where
    mode = attrs.get_string("mode", "nearest")
    in_shape = state.layer_shape(data_inputs[0], node)
    out_shape = state.layer_shape(node.output[0], node)
    if mode not in _RESIZE_MODES:
        raise UnsupportedOperator(
            node.op_type, where, f"only nearest and linear modes are supported, got {mode!r}"
        )
    integral = len(in_shape) == 4 and all(
        o % i == 0 for o, i in zip(out_shape[2:], in_shape[2:], strict=True)
    )
    if not integral or out_shape[:2] != in_shape[:2]:
        raise UnsupportedOperator(
            node.op_type,
            where,
            f"only integer upscaling of H and W is supported, got {in_shape} -> {out_shape}",
        )
    return LayerSpec(_RESIZE_MODES[mode], data_inputs)


def reduce_mean(state: Conversion, node: onnx.NodeProto, attrs: Attributes, source: str) -> bool:
    """A mean over H and W: adaptive average pooling, then a flatten when the reduced axes are dropped."""
    where = node_name(node)
    shape = state.layer_shape(source, node)
    axes = _reduce_axes(state, node, attrs)
    if len(shape) != 4 or axes is None or sorted(axis % 4 for axis in axes) != [2, 3]:
        shown = "all axes" if axes is None else f"axes {list(axes)}"
        raise UnsupportedOperator(
            "ReduceMean",
            where,
            f"only a mean over H and W (axes 2, 3) is supported, got {shown} of {shape}",
        )
    pooled_shape = (shape[0], shape[1], 1, 1)
    pooled = state.add_layer(where, Op.ADAPTIVE_AVGPOOL2D, [state.alias[source]], shape, pooled_shape, {})
    if attrs.get_int("keepdims", 1):
        state.alias[node.output[0]] = pooled
        return True
    flat_shape = (shape[0], shape[1])
    state.alias[node.output[0]] = state.add_layer(
        f"{where}:flatten", Op.FLATTEN, [pooled], pooled_shape, flat_shape, {}
    )
    return True


def _reduce_axes(state: Conversion, node: onnx.NodeProto, attrs: Attributes) -> tuple[int, ...] | None:
    """The axes a reduction runs over (an attribute before opset 18, an input from 18); None for all."""
    if len(node.input) > 1 and node.input[1]:
        axes = node.input[1]
        if axes not in state.constants:
            raise UnsupportedOperator(node.op_type, attrs.where, "the reduction axes must be a constant")
        values = constant_values(state.constants[axes], attrs)
        if values.ndim != 1 or values.size > MAX_RANK:
            raise UnsupportedOperator(
                node.op_type,
                attrs.where,
                f"the axes {axes!r} must be a list of at most {MAX_RANK} integers",
            )
        return tuple(int(axis) for axis in values)
    if "axes" in attrs:
        return attrs.get_axes("axes")
    if attrs.get_int("noop_with_empty_axes", 0):
        raise UnsupportedOperator(node.op_type, attrs.where, "a reduction over no axes is not supported")
    return None


def _window_fields(attrs: Attributes) -> dict[str, Any]:
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedOperator(
            attrs.op_type, attrs.where, f"auto_pad={auto_pad} is not supported; export explicit pads"
        )
    if "kernel_shape" not in attrs:
        raise UnsupportedOperator(
            attrs.op_type, attrs.where, "the kernel_shape attribute is missing; export it explicitly"
        )
    kernel = attrs.get_ints("kernel_shape", (), 2)
    pads = attrs.get_ints("pads", (0, 0, 0, 0), 4)
    return {
        "kernel": kernel,
        "stride": attrs.get_ints("strides", (1, 1), 2),
        "padding": pads[:2],
        "end_padding": pads[2:],
        "dilation": attrs.get_ints("dilations", (1, 1), 2),
    }


def _require_symmetric(fields: dict[str, Any], attrs: Attributes) -> None:
    """Refuse a window padded differently at its end than at its start; drop the end padding."""
    end = fields.pop("end_padding")
    if end != fields["padding"]:
        pads = (*fields["padding"], *end)
        raise UnsupportedOperator(attrs.op_type, attrs.where, f"asymmetric padding {pads} is not supported")
