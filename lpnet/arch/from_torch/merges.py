"""Adds, multiplies and concatenations: the layers that combine tensors, and the parameter operands
that make them a per-channel scale, a position embedding or a class token."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from lpnet.arch.from_torch.nodes import numel, tensor_shape
from lpnet.arch.from_torch.state import GraphState, LayerCall
from lpnet.arch.ir import Op
from lpnet.errors import UnsupportedOperator

_ADD_FUNCTIONS = (operator.add, torch.add, operator.iadd)
_MUL_FUNCTIONS = (operator.mul, torch.mul, operator.imul)


def function_layer(g: GraphState, node: fx.Node) -> LayerCall | None:
    """The layer of an add, a multiply or a concatenation; None for other functions."""
    target = node.target
    if target in _ADD_FUNCTIONS:
        return _binary(g, node, Op.ADD, "add")
    if target in _MUL_FUNCTIONS:
        return _binary(g, node, Op.MUL, "mul")
    if target is torch.cat:
        return _concat(g, node)
    return None


def method_layer(g: GraphState, node: fx.Node) -> LayerCall | None:
    """The layer of `Tensor.add` or `Tensor.mul`; None for other methods."""
    method = str(node.target)
    if method in ("add", "mul"):
        return _binary(g, node, Op.ADD if method == "add" else Op.MUL, method)
    return None


def _binary(g: GraphState, node: fx.Node, op: Op, what: str) -> LayerCall:
    """add or mul of two tensors; with a per-channel parameter (a layer scale), a batchnorm2d."""
    args = list(node.args)
    params = [a for a in args if isinstance(a, fx.Node) and a.name in g.parameters]
    if len(args) == 2 and len(params) == 1:
        (param,) = params
        (tensor,) = [a for a in args if a is not param]
        if isinstance(tensor, fx.Node) and _per_channel(g, tensor, g.parameters[param.name]):
            return Op.BATCHNORM2D, {"inputs": [tensor]}
        if (
            op is Op.ADD
            and isinstance(tensor, fx.Node)
            and g.parameters[param.name] == (1, *tensor_shape(tensor)[1:])
        ):
            return Op.POSITION_EMBEDDING, {"inputs": [tensor]}
        raise UnsupportedOperator(
            what,
            node.name,
            f"only a per-channel parameter can be a {what} operand, got one of shape "
            f"{g.parameters[param.name]}",
        )
    return op, {"inputs": _tensor_args(node, what)}


def _per_channel(g: GraphState, tensor: fx.Node, shape: tuple[int, ...]) -> bool:
    """A parameter of `shape` broadcasts one value per channel over `tensor`."""
    channels = g.ir_shape(tensor)[1]
    if tensor.name in g.channels_last:
        return shape in ((channels,), (1, 1, channels), (1, 1, 1, channels))
    return shape in ((channels, 1, 1), (1, channels, 1, 1))


def _tensor_args(node: fx.Node, what: str) -> list[fx.Node]:
    args = list(node.args)
    if not all(isinstance(a, fx.Node) for a in args) or len(args) != 2:
        raise UnsupportedOperator(what, node.name, "only tensor-tensor operations are supported, not scalars")
    shapes = [tensor_shape(a) for a in args]
    if what == "add" and shapes[0] != shapes[1]:
        raise UnsupportedOperator(what, node.name, f"broadcasting add of shapes {shapes} is not supported")
    # Put the full-size tensor first so in_hw describes the larger operand (x * scale).
    args.sort(key=lambda a: -numel(tensor_shape(a)))
    return args  # type: ignore[return-value]


def _concat(g: GraphState, node: fx.Node) -> LayerCall:
    tensors = list(node.args[0])  # type: ignore[arg-type]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if len(tensors) == 2 and tensors[0].name in g.parameters and tensors[1].name in g.channels_last:
        token, sequence = tensor_shape(tensors[0]), tensor_shape(tensors[1])
        if len(sequence) == 3 and dim in (1, -2) and token[1:] == (1, sequence[2]):
            return Op.CLASS_TOKEN, {"inputs": [tensors[1]]}
    if dim != 1:
        raise UnsupportedOperator(
            "cat", node.name, f"only concatenation along channels (dim=1), got dim={dim}"
        )
    total = sum(tensor_shape(t)[1] for t in tensors)
    return Op.CONCAT, {"inputs": tensors, "in_channels": total}
