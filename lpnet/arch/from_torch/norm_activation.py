"""Normalisations and activations: batch, layer and local response norms, softmax, and the
activation functions the IR knows."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lpnet.arch.from_torch.nodes import bind, tensor_shape
from lpnet.arch.from_torch.state import GraphState, LayerCall
from lpnet.arch.ir import Op
from lpnet.errors import UnsupportedOperator

_ACTIVATION_MODULES: dict[type[nn.Module], Op] = {
    nn.ReLU: Op.RELU,
    nn.ReLU6: Op.RELU6,
    nn.SiLU: Op.SILU,
    nn.GELU: Op.GELU,
    nn.Sigmoid: Op.SIGMOID,
    nn.Tanh: Op.TANH,
    nn.Hardswish: Op.HARDSWISH,
    nn.Hardsigmoid: Op.HARDSIGMOID,
}
_ACTIVATION_FUNCTIONS: dict[Any, Op] = {
    F.relu: Op.RELU,
    torch.relu: Op.RELU,
    F.relu6: Op.RELU6,
    F.silu: Op.SILU,
    F.gelu: Op.GELU,
    torch.sigmoid: Op.SIGMOID,
    F.sigmoid: Op.SIGMOID,
    torch.tanh: Op.TANH,
    F.hardswish: Op.HARDSWISH,
    F.hardsigmoid: Op.HARDSIGMOID,
}
_ACTIVATION_METHODS: dict[str, Op] = {"relu": Op.RELU, "sigmoid": Op.SIGMOID, "tanh": Op.TANH}
# Positional parameters of the functions whose arguments are read by name.
_FUNCTION_PARAMETERS: dict[Any, tuple[str, ...]] = {
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.softmax: ("input", "dim"),
    torch.softmax: ("input", "dim"),
    F.local_response_norm: ("input", "size", "alpha", "beta", "k"),
}


def module_layer(g: GraphState, node: fx.Node, module: nn.Module) -> LayerCall | None:
    """The layer a norm, softmax or activation module computes; None for other modules."""
    inputs = [node.args[0]]
    if isinstance(module, nn.BatchNorm2d):
        return Op.BATCHNORM2D, {"inputs": inputs}
    if type(module) in _ACTIVATION_MODULES:
        return _ACTIVATION_MODULES[type(module)], {"inputs": inputs}
    if isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0):
        return Op.RELU6, {"inputs": inputs}
    if isinstance(module, nn.LocalResponseNorm):
        return Op.LRN, {"inputs": inputs, "kernel": (int(module.size), 1)}
    if isinstance(module, nn.Softmax):
        return _softmax(g, node, module.dim)
    if isinstance(module, nn.LayerNorm):
        return _layer_norm(g, node, module.normalized_shape)
    return None


def function_layer(g: GraphState, node: fx.Node) -> LayerCall | None:
    """The layer a norm, softmax or activation function computes; None for other functions."""
    target = node.target
    if target in _ACTIVATION_FUNCTIONS:
        return _ACTIVATION_FUNCTIONS[target], {"inputs": [node.args[0]]}
    if target not in _FUNCTION_PARAMETERS:
        return None
    bound = bind(node, _FUNCTION_PARAMETERS[target])
    if target is F.layer_norm:
        return _layer_norm(g, node, bound["normalized_shape"])
    if target is F.local_response_norm:
        return Op.LRN, {"inputs": [node.args[0]], "kernel": (int(bound["size"]), 1)}
    return _softmax(g, node, bound.get("dim"))


def method_layer(g: GraphState, node: fx.Node) -> LayerCall | None:
    """The layer of an activation or softmax method; None for other methods."""
    method = str(node.target)
    if method in _ACTIVATION_METHODS:
        return _ACTIVATION_METHODS[method], {"inputs": [node.args[0]]}
    if method == "softmax":
        return _softmax(g, node, bind(node, ("self", "dim")).get("dim"))
    return None


def _layer_norm(g: GraphState, node: fx.Node, normalized_shape: Any) -> LayerCall:
    source = node.args[0]
    assert isinstance(source, fx.Node)
    shape = (
        tuple(int(d) for d in normalized_shape)
        if not isinstance(normalized_shape, int)
        else (normalized_shape,)
    )
    if source.name not in g.channels_last and len(tensor_shape(source)) == 2:
        if shape == tensor_shape(source)[1:]:
            return Op.LAYERNORM, {"inputs": [source]}
    if source.name in g.channels_last and shape == (g.ir_shape(source)[1],):
        return Op.LAYERNORM, {"inputs": [source]}
    raise UnsupportedOperator(
        "layer_norm",
        node.name,
        f"only a layer norm over the channels (of a channels-last map or of (N, F) features) is "
        f"supported, got normalized_shape={shape} on {tensor_shape(source)}",
    )


def _softmax(g: GraphState, node: fx.Node, dim: Any) -> LayerCall:
    source = node.args[0]
    assert isinstance(source, fx.Node)
    rank = len(tensor_shape(source))
    if dim is None or source.name in g.channels_last or int(dim) % rank != 1:
        raise UnsupportedOperator(
            "softmax", node.name, f"only a softmax over channels (dim=1) is supported, got dim={dim}"
        )
    return Op.SOFTMAX, {"inputs": [source]}
