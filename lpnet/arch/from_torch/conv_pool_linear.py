"""Convolutions, pools, linears, padding and upsampling: the layers that change a map's size or
channels by a kernel, a window or a matrix."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lpnet.arch.from_torch.nodes import bind, hw, pair, tensor_shape
from lpnet.arch.from_torch.state import GraphState, LayerCall
from lpnet.arch.ir import Op
from lpnet.errors import UnsupportedOperator

# Positional parameters of the functions whose arguments are read by name.
_FUNCTION_PARAMETERS: dict[Any, tuple[str, ...]] = {
    F.linear: ("input", "weight", "bias"),
    F.pad: ("input", "pad", "mode", "value"),
    F.interpolate: ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"),
}


def module_layer(g: GraphState, node: fx.Node, module: nn.Module) -> LayerCall | None:
    """The layer a conv, pool, linear, pad or upsample module computes; None for other modules."""
    where = str(node.target)
    inputs = [node.args[0]]
    if isinstance(module, nn.Conv2d):
        return _conv(where, inputs, module)
    if isinstance(module, nn.Linear):
        return _linear(g, node, module.bias is not None)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise UnsupportedOperator("maxpool2d", where, "return_indices=True is not supported")
        return Op.MAXPOOL2D, {
            "inputs": inputs,
            "kernel": pair(module.kernel_size),
            "stride": pair(module.stride if module.stride is not None else module.kernel_size),
            "padding": pair(module.padding),
            "dilation": pair(module.dilation),
            "ceil_mode": bool(module.ceil_mode),
        }
    if isinstance(module, nn.AvgPool2d):
        return Op.AVGPOOL2D, {
            "inputs": inputs,
            "kernel": pair(module.kernel_size),
            "stride": pair(module.stride if module.stride is not None else module.kernel_size),
            "padding": pair(module.padding),
            "ceil_mode": bool(module.ceil_mode),
        }
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return Op.ADAPTIVE_AVGPOOL2D, {"inputs": inputs}
    if isinstance(module, nn.ZeroPad2d | nn.ConstantPad2d):
        return _pad(node, module.padding, float(module.value), "constant")
    if isinstance(module, nn.Upsample):  # UpsamplingNearest2d and UpsamplingBilinear2d too
        return _upsample(node, module.mode)
    return None


def function_layer(g: GraphState, node: fx.Node) -> LayerCall | None:
    """The layer a pool, linear, pad or interpolate function computes; None for other functions."""
    target = node.target
    if target is F.adaptive_avg_pool2d:
        return Op.ADAPTIVE_AVGPOOL2D, {"inputs": [node.args[0]]}
    if target in (F.avg_pool2d, F.max_pool2d):
        return _functional_pool(node, Op.AVGPOOL2D if target is F.avg_pool2d else Op.MAXPOOL2D)
    if target not in _FUNCTION_PARAMETERS:
        return None
    bound = bind(node, _FUNCTION_PARAMETERS[target])
    if target is F.linear:
        return _linear(g, node, bound.get("bias") is not None)
    if target is F.pad:
        return _pad(node, bound["pad"], bound.get("value"), bound.get("mode", "constant"))
    return _interpolate(node, bound)


def _conv(where: str, inputs: list[Any], module: nn.Conv2d) -> LayerCall:
    if not isinstance(module.padding, tuple):
        raise UnsupportedOperator("conv2d", where, f"padding mode {module.padding!r} is not supported")
    if module.padding_mode != "zeros":
        raise UnsupportedOperator("conv2d", where, f"padding_mode={module.padding_mode!r} is not supported")
    return Op.CONV2D, {
        "inputs": inputs,
        "kernel": pair(module.kernel_size),
        "stride": pair(module.stride),
        "padding": pair(module.padding),
        "dilation": pair(module.dilation),
        "groups": module.groups,
        "bias": module.bias is not None,
    }


def _linear(g: GraphState, node: fx.Node, bias: bool) -> LayerCall:
    """A linear layer; over the channels of a channels-last map, the 1x1 convolution it equals."""
    source = node.args[0]
    assert isinstance(source, fx.Node)
    if source.name in g.channels_last:
        return Op.CONV2D, {"inputs": [source], "bias": bias}
    if len(tensor_shape(source)) != 2:
        raise UnsupportedOperator(
            "linear",
            node.name,
            f"only a linear layer on (N, F) features or on channels-last maps, got {tensor_shape(source)}",
        )
    return Op.LINEAR, {"inputs": [source], "bias": bias}


def _pad(node: fx.Node, pad: Any, value: Any, mode: str) -> LayerCall:
    """Zero padding of H and W, the same on both sides of each."""
    amounts = (pad,) * 4 if isinstance(pad, int) else tuple(pad)
    if len(amounts) == 2:
        amounts = (*amounts, 0, 0)
    if mode != "constant" or value not in (None, 0, 0.0) or len(amounts) != 4:
        raise UnsupportedOperator(
            "pad",
            node.name,
            f"only zero padding of H and W is supported, got mode={mode!r} value={value}",
        )
    left, right, top, bottom = (int(a) for a in amounts)
    if left != right or top != bottom or min(amounts) < 0:
        raise UnsupportedOperator(
            "pad",
            node.name,
            f"only the same non-negative padding on both sides is supported, got {amounts}",
        )
    return Op.PAD, {"inputs": [node.args[0]], "padding": (top, left)}


def _upsample(node: fx.Node, mode: str) -> LayerCall:
    source = node.args[0]
    assert isinstance(source, fx.Node)
    ops = {"nearest": Op.UPSAMPLE_NEAREST, "bilinear": Op.UPSAMPLE_BILINEAR}
    if mode not in ops:
        raise UnsupportedOperator(
            "upsample", node.name, f"only nearest and bilinear modes are supported, got {mode!r}"
        )
    in_hw, out_hw = hw(tensor_shape(source)), hw(tensor_shape(node))
    if any(o % i for o, i in zip(out_hw, in_hw, strict=True)) or len(tensor_shape(source)) != 4:
        raise UnsupportedOperator(
            "upsample", node.name, f"only integer scale factors are supported, got {in_hw} -> {out_hw}"
        )
    return ops[mode], {"inputs": [source]}


def _interpolate(node: fx.Node, bound: dict[str, Any]) -> LayerCall:
    if bound.get("antialias"):
        raise UnsupportedOperator("interpolate", node.name, "antialias=True is not supported")
    return _upsample(node, str(bound.get("mode", "nearest")))


def _functional_pool(node: fx.Node, op: Op) -> LayerCall:
    names = ["input", "kernel_size", "stride", "padding"]
    if op is Op.MAXPOOL2D:
        names += ["dilation", "ceil_mode", "return_indices"]
    else:
        names += ["ceil_mode", "count_include_pad", "divisor_override"]
    bound = bind(node, names)
    kernel = pair(bound["kernel_size"])
    stride = bound.get("stride") or kernel
    attrs: dict[str, Any] = {
        "inputs": [bound["input"]],
        "kernel": kernel,
        "stride": pair(stride),
        "padding": pair(bound.get("padding", 0)),
        "ceil_mode": bool(bound.get("ceil_mode", False)),
    }
    if op is Op.MAXPOOL2D:
        if bound.get("return_indices"):
            raise UnsupportedOperator("max_pool2d", node.name, "return_indices=True is not supported")
        attrs["dilation"] = pair(bound.get("dilation", 1))
    elif bound.get("divisor_override"):
        raise UnsupportedOperator("avg_pool2d", node.name, "divisor_override is not supported")
    return op, attrs
