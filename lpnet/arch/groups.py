"""Prunable channel groups, and width vectors over them.

Channels coupled by residual adds, concatenations or depthwise convolutions must be pruned together.
The coupling comes from torch-pruning's DependencyGraph (one analysis, not two); from it we derive,
for every layer, its input and output channel counts as linear functions of the per-group kept
counts (`ChannelExpr`). That makes "apply a width vector" plain arithmetic, and lets a predictor
differentiate latency with respect to the kept counts.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from lpnet.arch.build import IR_LAYER_META, build_module
from lpnet.arch.ir import NETWORK_INPUT, TRANSFORMER_OPS, Layer, Network, Op
from lpnet.errors import InvalidWidthVector


@dataclass(frozen=True)
class ChannelExpr:
    """A channel count as `constant + sum(coef * widths[group])`."""

    constant: int
    terms: tuple[tuple[int, int], ...] = ()

    def evaluate(self, widths: Sequence[int]) -> int:
        return self.constant + sum(coef * widths[g] for g, coef in self.terms)

    def __add__(self, other: ChannelExpr) -> ChannelExpr:
        merged: dict[int, int] = dict(self.terms)
        for g, coef in other.terms:
            merged[g] = merged.get(g, 0) + coef
        return ChannelExpr(self.constant + other.constant, tuple(sorted(merged.items())))

    def scale(self, factor: int) -> ChannelExpr:
        return ChannelExpr(self.constant * factor, tuple((g, c * factor) for g, c in self.terms))


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that must be kept or removed together.

    Attributes:
        index: position in the width vector.
        channels: the unpruned channel count.
        out_layers: conv/linear layers whose output channel count this group sets.
        members: every layer whose input or output channels belong to this group.
        divisor: the kept count must be a multiple of this (grouped convolutions need it).
    """

    index: int
    channels: int
    out_layers: tuple[str, ...]
    members: tuple[str, ...]
    divisor: int = 1


@dataclass(frozen=True)
class ChannelLayout:
    """The groups of a network and every layer's channel counts as functions of a width vector."""

    network_hash: str
    groups: tuple[ChannelGroup, ...]
    in_expr: dict[str, ChannelExpr]
    out_expr: dict[str, ChannelExpr]

    @property
    def full_widths(self) -> list[int]:
        return [g.channels for g in self.groups]

    def validate(self, widths: Sequence[int]) -> list[int]:
        """Check a width vector against the groups; returns it as a list of ints."""
        if len(widths) != len(self.groups):
            raise InvalidWidthVector(
                f"width vector has {len(widths)} entries but the network has {len(self.groups)} channel groups",
                {"expected_length": len(self.groups), "got_length": len(widths)},
            )
        values = []
        for group, value in zip(self.groups, widths, strict=True):
            if isinstance(value, bool) or int(value) != value:
                raise InvalidWidthVector(f"width of group {group.index} must be an integer, got {value!r}")
            k = int(value)
            if not group.divisor <= k <= group.channels or k % group.divisor:
                raise InvalidWidthVector(
                    f"group {group.index} keeps {k} channels; it must be a multiple of {group.divisor} "
                    f"between {group.divisor} and {group.channels}",
                    {"group": group.index, "value": k, "max": group.channels, "divisor": group.divisor},
                )
            values.append(k)
        return values


_CACHE_SIZE = 64
_cache: OrderedDict[str, ChannelLayout] = OrderedDict()
_cache_lock = threading.Lock()


def layout_key(network: Network) -> str:
    """Cache key of anything derived from a network's channel layout.

    The content hash ignores layer names and listing order, but channel expressions are keyed by
    layer name and groups are numbered in listing order: both must be part of the key.
    """
    return network.content_hash + "|" + "\x1f".join(layer.name for layer in network.layers)


def channel_layout(network: Network) -> ChannelLayout:
    """Groups and channel expressions of a network (cached by `layout_key`)."""
    key = layout_key(network)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    layout = _compute_layout(network)
    with _cache_lock:
        _cache[key] = layout
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return layout


def channel_groups(network: Network) -> list[ChannelGroup]:
    """The prunable channel groups of a network, in width-vector order."""
    return list(channel_layout(network).groups)


def apply_width_vector(network: Network, widths: Sequence[int]) -> Network:
    """The network with each group pruned to its kept-channel count (shapes only, no weights)."""
    layout = channel_layout(network)
    values = layout.validate(widths)
    layers = []
    for layer in network.layers:
        in_c = layout.in_expr[layer.name].evaluate(values)
        out_c = layout.out_expr[layer.name].evaluate(values)
        groups = in_c if layer.is_depthwise else layer.groups
        layers.append(layer.model_copy(update={"in_channels": in_c, "out_channels": out_c, "groups": groups}))
    pruned = network.model_copy(update={"layers": layers})
    return Network.model_validate(pruned.model_dump())  # re-validate shapes of the pruned graph


# Ops that need a fixed channel count at their input: a slice reads fixed channel positions, and a
# channel shuffle interleaves the parts of its input, whose sizes a pruned group would change. Groups
# whose channels reach one of them are not prunable.
# Transformer ops pin their channels too: heads divide the embedding, and learned tokens, embeddings
# and attention projections are sized by it.
_PINNING_OPS = frozenset({Op.SLICE, Op.CHANNEL_SHUFFLE}) | TRANSFORMER_OPS


def _channel_exprs(
    network: Network, out_layer_groups: list[tuple[int, list[str]]]
) -> tuple[dict[str, ChannelExpr], dict[str, ChannelExpr]]:
    """Every layer's input and output channel counts as expressions of the groups given."""
    group_of_layer: dict[str, int] = {}
    for index, (_, out_layers) in enumerate(out_layer_groups):
        for name in out_layers:
            group_of_layer[name] = index
    in_expr: dict[str, ChannelExpr] = {}
    out_expr: dict[str, ChannelExpr] = {NETWORK_INPUT: ChannelExpr(network.input_shape[1])}
    for layer in network.layers:
        inputs = [out_expr[ref] for ref in layer.inputs]
        if layer.op is Op.CONCAT:
            expr_in = inputs[0]
            for extra in inputs[1:]:
                expr_in = expr_in + extra
        else:
            expr_in = inputs[0]
        in_expr[layer.name] = expr_in
        out_expr[layer.name] = _output_expr(layer, expr_in, group_of_layer.get(layer.name))
    return in_expr, out_expr


def _compute_layout(network: Network) -> ChannelLayout:
    order = {layer.name: i for i, layer in enumerate(network.layers)}
    # Width vectors list groups in the order their first layer runs, whatever order tp found them.
    out_layer_groups = sorted(_torch_pruning_groups(network), key=lambda g: min(order[n] for n in g[1]))
    in_expr, out_expr = _channel_exprs(network, out_layer_groups)
    pinned = {g for layer in network.layers if layer.op in _PINNING_OPS for g, _ in in_expr[layer.name].terms}
    if pinned:
        out_layer_groups = [group for g, group in enumerate(out_layer_groups) if g not in pinned]
        in_expr, out_expr = _channel_exprs(network, out_layer_groups)
    full = [channels for channels, _ in out_layer_groups]
    for layer in network.layers:  # the expressions must reproduce the unpruned network exactly
        if (in_expr[layer.name].evaluate(full), out_expr[layer.name].evaluate(full)) != (
            layer.in_channels,
            layer.out_channels,
        ):
            raise AssertionError(f"channel expressions disagree with layer {layer.name!r}")
    del out_expr[NETWORK_INPUT]
    divisors = [1] * len(out_layer_groups)
    members: list[set[str]] = [set() for _ in out_layer_groups]
    for layer in network.layers:
        for expr in (in_expr[layer.name], out_expr[layer.name]):
            for g, _ in expr.terms:
                members[g].add(layer.name)
                if layer.op is Op.CONV2D and layer.groups > 1 and not layer.is_depthwise:
                    divisors[g] = math.lcm(divisors[g], layer.groups)
    groups = tuple(
        ChannelGroup(
            index=i,
            channels=channels,
            out_layers=tuple(sorted(out_layers, key=order.__getitem__)),
            members=tuple(sorted(members[i], key=order.__getitem__)),
            divisor=divisors[i],
        )
        for i, (channels, out_layers) in enumerate(out_layer_groups)
    )
    return ChannelLayout(network.content_hash, groups, in_expr, out_expr)


def _output_expr(layer: Layer, expr_in: ChannelExpr, group: int | None) -> ChannelExpr:
    if layer.op is Op.CONV2D:
        if layer.is_depthwise:
            return expr_in.scale(layer.out_channels // layer.in_channels)
        return ChannelExpr(0, ((group, 1),)) if group is not None else ChannelExpr(layer.out_channels)
    if layer.op is Op.LINEAR:
        return ChannelExpr(0, ((group, 1),)) if group is not None else ChannelExpr(layer.out_channels)
    if layer.op is Op.FLATTEN:
        return expr_in.scale(layer.in_hw[0] * layer.in_hw[1])
    if layer.op is Op.SLICE:
        return ChannelExpr(layer.out_channels)
    if layer.op is Op.SPACE_TO_DEPTH:
        return expr_in.scale(4)
    return expr_in


def _torch_pruning_groups(network: Network) -> list[tuple[int, list[str]]]:
    """(channels, conv/linear layers whose outputs the group prunes) per prunable group.

    Layers that produce a network output are never pruned: their width is the model's interface.
    The module is built and traced on the meta device: torch-pruning follows the autograd graph and
    the shapes, never the values, so nothing is allocated or computed at the network's size.
    Slices and channel shuffles, which torch-pruning does not follow, are built as unpruned 1x1
    convolutions of the same channel counts: the groups reaching them are dropped afterwards.
    """
    with torch.device("meta"):
        gm = build_module(_pruning_surrogate(network))
    node_layer = gm.meta[IR_LAYER_META]
    module_layer: dict[int, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module_layer[id(gm.get_submodule(str(node.target)))] = node_layer[node.name]
    by_name = network.by_name
    output_layers = {_producing_param_layer(network, name) for name in network.outputs} - {None}
    barriers = {layer.name for layer in network.layers if layer.op in _PINNING_OPS}
    ignored = [
        gm.get_submodule(str(node.target))
        for node in gm.graph.nodes
        if node.op == "call_module" and node_layer[node.name] in output_layers | barriers
    ]
    example = torch.zeros(network.input_shape, device="meta")
    graph = tp.DependencyGraph().build_dependency(gm, example_inputs=example)
    result: list[tuple[int, list[str]]] = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        out_layers: list[str] = []
        channels = 0
        for dep, idxs in group:
            name = module_layer.get(id(dep.target.module))
            if name is None or dep.handler.__name__ != "prune_out_channels":
                continue
            layer = by_name[name]
            if layer.op in (Op.CONV2D, Op.LINEAR) and not layer.is_depthwise:
                out_layers.append(name)
                channels = max(channels, len(idxs))
        if out_layers:
            result.append((channels, out_layers))
    return result


def _pruning_surrogate(network: Network) -> Network:
    """The network with each pinning op replaced by a convolution of its channels and shapes.

    The convolution has stride 1 and the kernel and padding that map the op's input size to its
    output size (1x1 when they are equal); `token_select`, whose output is (N, C) features, stays.
    """
    if not any(layer.op in _PINNING_OPS for layer in network.layers):
        return network
    layers = [
        _surrogate_conv(layer) if layer.op in _PINNING_OPS and layer.op is not Op.TOKEN_SELECT else layer
        for layer in network.layers
    ]
    return network.model_copy(update={"layers": layers})


def _surrogate_conv(layer: Layer) -> Layer:
    padding = tuple(max(0, -(-(o - i) // 2)) for i, o in zip(layer.in_hw, layer.out_hw, strict=True))
    kernel = tuple(i + 2 * p - o + 1 for i, o, p in zip(layer.in_hw, layer.out_hw, padding, strict=True))
    return Layer(
        name=layer.name,
        op=Op.CONV2D,
        inputs=layer.inputs,
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        in_hw=layer.in_hw,
        out_hw=layer.out_hw,
        kernel=kernel,
        padding=padding,
    )


def _producing_param_layer(network: Network, name: str) -> str | None:
    """The conv/linear whose output channels reach `name` unchanged (through activations etc.)."""
    layer = network.by_name[name]
    while layer.op not in (Op.CONV2D, Op.LINEAR):
        if layer.op in (Op.CONCAT, Op.ADD, Op.MUL) or layer.inputs[0] == NETWORK_INPUT:
            return None
        layer = network.by_name[layer.inputs[0]]
    return layer.name
