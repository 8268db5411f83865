"""Converts a shape-propagated fx graph into IR layers.

Besides tensors in (N, C, H, W), it follows what a CNN computes between layers without being a
layer: shapes read as numbers (`x.size()`, `x.shape`) and arithmetic on them, the 5-D view of a
channel shuffle, the parts of a chunk along channels, and channels-last tensors (a permute to
(N, H, W, C) followed by layer norms, linears over the channels and activations, and a permute
back), which become NCHW layers: a channels-last layer norm is `layernorm`, a linear over the
channels a 1x1 `conv2d`. Token sequences are channels-last too: (N, L, C) is the IR's
(N, C, 1, L), and (N, C, L) (a map reshaped to its positions) the same map before its permute.
Computations on parameters alone (a class token expanded to the batch, Swin's position bias
tables) are weights, not layers: their results count as parameters of the layer reading them.

Each call becomes a layer through the mapper of its family (`attention`, `conv_pool_linear`,
`merges`, `norm_activation`, `views`); views are handled before any mapper is asked.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lpnet.arch.from_torch import attention, conv_pool_linear, merges, norm_activation, views
from lpnet.arch.from_torch.nodes import flatten_args
from lpnet.arch.from_torch.state import GraphState, LayerCall
from lpnet.arch.ir import ACTIVATIONS, NETWORK_INPUT, Layer, Op
from lpnet.errors import UnsupportedOperator

# Modules and functions that are the identity at inference: their output aliases their input.
_INFERENCE_NOOP_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout2d, nn.Identity)
_INFERENCE_NOOP_METHODS = frozenset({"contiguous", "clone", "detach"})
# Layers that compute on a channels-last tensor as they would on its NCHW original (conv2d stands for
# a linear over the channels, batchnorm2d for a per-channel scale).
# Attention, position embeddings, class tokens and patch merging are defined on channels-last maps and
# token sequences, whose NCHW form the IR holds.
_CHANNELS_LAST_OPS = ACTIVATIONS | {
    Op.ADD,
    Op.MUL,
    Op.LAYERNORM,
    Op.CONV2D,
    Op.BATCHNORM2D,
    Op.CLASS_TOKEN,
    Op.POSITION_EMBEDDING,
    Op.ATTENTION,
    Op.SPACE_TO_DEPTH,
}
_MODULE_MAPPERS = (
    attention.module_layer,
    conv_pool_linear.module_layer,
    norm_activation.module_layer,
    views.module_layer,
)
_FUNCTION_MAPPERS = (
    merges.function_layer,
    norm_activation.function_layer,
    attention.function_layer,
    views.function_layer,
    conv_pool_linear.function_layer,
)
_METHOD_MAPPERS = (norm_activation.method_layer, views.method_layer, merges.method_layer)


@cache
def _inference_noop_functions() -> frozenset[Any]:
    fns: set[Any] = {F.dropout, torch.dropout}
    try:  # torchvision's stochastic depth is the identity when not training
        from torchvision.ops import stochastic_depth

        fns.add(stochastic_depth)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return frozenset(fns)


def convert_graph(graph_module: fx.GraphModule) -> tuple[list[Layer], list[str]]:
    """The IR layers of a shape-propagated fx graph, and the names of its output tensors."""
    g = GraphState()
    modules = dict(graph_module.named_modules())
    outputs: list[str] = []
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            g.alias[node.name] = NETWORK_INPUT
        elif node.op == "output":
            outputs = [g.ref(arg) for arg in flatten_args(node.args[0])]
        elif node.op == "get_attr":
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                g.parameters[node.name] = tuple(int(d) for d in meta.shape)
            else:
                g.scalars.add(node.name)
        else:
            _convert_node(g, modules, node)
    return g.layers, outputs


def _convert_node(g: GraphState, modules: dict[str, nn.Module], node: fx.Node) -> None:
    if node.meta.get("tensor_meta") is None:  # a number or a shape, not a tensor
        g.scalars.add(node.name)
        return
    if _computes_on_parameters(g, node):
        meta = node.meta["tensor_meta"]
        g.parameters[node.name] = tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else ()
        return
    if views.convert_view(g, node):
        return
    layer = _layer_call(g, modules, node)
    if layer is not None:
        base, (op, attrs) = layer
        _append_layer(g, node, base, op, attrs)


def _computes_on_parameters(g: GraphState, node: fx.Node) -> bool:
    """Whether every tensor `node` reads is a parameter or computed from parameters alone."""
    tensors = [
        arg
        for arg in flatten_args([*node.args, *node.kwargs.values()])
        if isinstance(arg, fx.Node) and arg.name not in g.scalars
    ]
    return bool(tensors) and all(arg.name in g.parameters for arg in tensors)


def _layer_call(g: GraphState, modules: dict[str, nn.Module], node: fx.Node) -> tuple[str, LayerCall] | None:
    """The base name and the layer a call computes; None when the call is handled here instead (an
    identity at inference, an nn.MultiheadAttention, which adds its own layer, a MaxViT partition)."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, _INFERENCE_NOOP_MODULES):
            g.same_tensor(node, node.args[0])  # type: ignore[arg-type]
            return None
        if isinstance(module, nn.MultiheadAttention):
            attention.multihead_attention(g, node, module)
            return None
        if attention.maxvit_partition(g, node, module):
            return None
        return str(node.target), _module_op(g, node, module)
    if node.op == "call_function":
        if node.target in _inference_noop_functions():
            g.same_tensor(node, node.args[0])  # type: ignore[arg-type]
            return None
        if node.target is torch.cat and len(node.args[0]) == 1:  # type: ignore[arg-type]
            g.same_tensor(node, node.args[0][0])  # type: ignore[index, arg-type]
            return None
        return node.name, _function_op(g, node)
    if node.op == "call_method":
        if node.target in _INFERENCE_NOOP_METHODS:
            g.same_tensor(node, node.args[0])  # type: ignore[arg-type]
            return None
        return node.name, _method_op(g, node)
    raise UnsupportedOperator(node.op, node.name)  # pragma: no cover - fx has no other node kinds


def _append_layer(g: GraphState, node: fx.Node, base: str, op: Op, attrs: dict[str, Any]) -> None:
    """Add the layer `node` computes; on channels-last inputs, the NCHW layer it equals."""
    inputs: list[fx.Node] = attrs.pop("inputs")
    layouts = {arg.name in g.channels_last for arg in inputs}
    if True in layouts:
        if op not in _CHANNELS_LAST_OPS or len(layouts) > 1:
            g.ref(next(arg for arg in inputs if arg.name in g.channels_last))  # raises
        refs = [g.alias[arg.name] for arg in inputs]
        g.channels_last.add(node.name)
        partitions = {g.partitions[arg.name] for arg in inputs if arg.name in g.partitions}
        if partitions:
            if len(partitions) != 1 or any(arg.name not in g.partitions for arg in inputs):
                raise UnsupportedOperator(
                    op.value, node.name, "its inputs must be the same MaxViT partition of one map"
                )
            g.partitions[node.name] = next(iter(partitions))
    else:
        refs = [g.ref(arg) for arg in inputs]
    in_shape = g.ir_shape(inputs[0])
    out_shape = g.ir_shape(node)
    g.alias[node.name] = g.add_layer(base, op, refs, in_shape, out_shape, **attrs)


def _module_op(g: GraphState, node: fx.Node, module: nn.Module) -> LayerCall:
    source = node.args[0]
    if (
        isinstance(module, nn.Conv2d | nn.BatchNorm2d)
        and isinstance(source, fx.Node)
        and source.name in g.channels_last
    ):
        g.ref(source)  # raises: a 2-D convolution or batch norm of a channels-last tensor
    for mapper in _MODULE_MAPPERS:
        layer = mapper(g, node, module)
        if layer is not None:
            return layer
    raise UnsupportedOperator(type(module).__name__, str(node.target))


def _function_op(g: GraphState, node: fx.Node) -> LayerCall:
    for mapper in _FUNCTION_MAPPERS:
        layer = mapper(g, node)
        if layer is not None:
            return layer
    target = node.target
    raise UnsupportedOperator(getattr(target, "__name__", str(target)), node.name)


def _method_op(g: GraphState, node: fx.Node) -> LayerCall:
    for mapper in _METHOD_MAPPERS:
        layer = mapper(g, node)
        if layer is not None:
            return layer
    raise UnsupportedOperator(f"Tensor.{node.target}", node.name)
