"""Materialise an IR network as a real nn.Module (a torch.fx GraphModule) with random weights."""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch import nn

from lpnet.arch.ir import NETWORK_INPUT, Layer, Network, Op

# Key of GraphModule.meta mapping fx node names to IR layer names (fx renames dotted names).
IR_LAYER_META = "lpnet_ir_layer"

_ACTIVATIONS: dict[Op, type[nn.Module]] = {
    Op.RELU: nn.ReLU,
    Op.RELU6: nn.ReLU6,
    Op.SILU: nn.SiLU,
    Op.GELU: nn.GELU,
    Op.SIGMOID: nn.Sigmoid,
    Op.TANH: nn.Tanh,
    Op.HARDSWISH: nn.Hardswish,
    Op.HARDSIGMOID: nn.Hardsigmoid,
}


def layer_module(layer: Layer) -> nn.Module | None:
    """The nn.Module computing one IR layer, or None for ops that are plain functions (add, cat...)."""
    if layer.op is Op.CONV2D:
        return nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            kernel_size=layer.kernel,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias,
        )
    if layer.op is Op.LINEAR:
        return nn.Linear(layer.in_channels, layer.out_channels, bias=layer.bias)
    if layer.op is Op.BATCHNORM2D:
        return nn.BatchNorm2d(layer.in_channels)
    if layer.op in _ACTIVATIONS:
        return _ACTIVATIONS[layer.op]()
    if layer.op is Op.MAXPOOL2D:
        return nn.MaxPool2d(
            layer.kernel, layer.stride, layer.padding, layer.dilation, ceil_mode=layer.ceil_mode
        )
    if layer.op is Op.AVGPOOL2D:
        return nn.AvgPool2d(layer.kernel, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
    if layer.op is Op.ADAPTIVE_AVGPOOL2D:
        return nn.AdaptiveAvgPool2d(layer.out_hw)
    return None


def build_module(network: Network) -> fx.GraphModule:
    """Build a runnable module of the network's exact shapes, with random weights, in eval mode.

    Node names follow the IR layer names as closely as fx allows; `gm.meta[IR_LAYER_META]` maps
    each computing node's name to its IR layer name.
    """
    root = nn.Module()
    graph = fx.Graph()
    values: dict[str, fx.Node] = {NETWORK_INPUT: graph.placeholder("x")}
    node_to_layer: dict[str, str] = {}
    used_attrs: set[str] = set()
    for layer in network.layers:
        args = [values[ref] for ref in layer.inputs]
        module = layer_module(layer)
        if module is not None:
            attr = _attribute_name(layer.name, used_attrs)
            root.add_module(attr, module)
            node = graph.call_module(attr, (args[0],))
        elif layer.op is Op.ADD or layer.op is Op.MUL:
            fn = operator.add if layer.op is Op.ADD else operator.mul
            node = graph.call_function(fn, (args[0], args[1]))
            for extra in args[2:]:
                node = graph.call_function(fn, (node, extra))
        elif layer.op is Op.CONCAT:
            node = graph.call_function(torch.cat, (args, 1))
        elif layer.op is Op.FLATTEN:
            node = graph.call_function(torch.flatten, (args[0], 1))
        else:  # pragma: no cover - every Op is handled above
            raise AssertionError(f"no builder for {layer.op}")
        values[layer.name] = node
        node_to_layer[node.name] = layer.name
    outputs = [values[name] for name in network.outputs]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    gm = fx.GraphModule(root, graph, class_name=_attribute_name(network.name or "Network", set()))
    gm.meta[IR_LAYER_META] = node_to_layer
    return gm.eval()


def _attribute_name(name: str, used: set[str]) -> str:
    base = re.sub(r"\W", "_", name)
    if not base or base[0].isdigit():
        base = f"m_{base}"
    attr, k = base, 1
    while attr in used:
        attr = f"{base}_{k}"
        k += 1
    used.add(attr)
    return attr
