"""Views and shapes: nodes that re-view a tensor (numbers, permutes, reshapes, chunks, slices,
flattens, channel shuffles) and the mean over H and W.

Most views become no layer: they alias the IR tensor they read, or record what the node stands for
(a channels-last tensor, the grouped view of a channel shuffle, the parts of a split) until a layer
reads it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lpnet.arch.from_torch.nodes import bind, numel, tensor_shape
from lpnet.arch.from_torch.state import GraphState, GroupedChannels, LayerCall, Parts
from lpnet.arch.ir import Op
from lpnet.errors import UnsupportedOperator

# Functions that re-view a tensor (or read a part of it), by the method name they equal.
_VIEW_FUNCTIONS: dict[Any, str] = {
    operator.getitem: "getitem",
    torch.chunk: "chunk",
    torch.split: "split",
    torch.reshape: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.flatten: "flatten",
    torch.mean: "mean",
}
_CHANNEL_SHUFFLE_FUNCTIONS = (torch.channel_shuffle, torch.native_channel_shuffle)


def convert_view(g: GraphState, node: fx.Node) -> bool:
    """Handle a node that re-views a tensor rather than computing on it; False when it is not one."""
    target = node.target
    if node.op == "call_method":
        kind = str(target)
    elif node.op == "call_function" and target in _VIEW_FUNCTIONS:
        kind = _VIEW_FUNCTIONS[target]
    else:
        return False
    if kind == "getitem":
        return _getitem(g, node)
    source = node.args[0]
    if not isinstance(source, fx.Node):
        return False
    if kind in ("chunk", "split"):
        _split(g, node, source)
        return True
    if kind == "mean":
        _mean(g, node, source)
        return True
    if kind in ("view", "reshape") or (kind == "flatten" and source.name in g.grouped):
        return _reshape(g, node, source)
    if kind in ("permute", "transpose"):
        _permute(g, node, source)
        return True
    return False


def module_layer(_g: GraphState, node: fx.Node, module: nn.Module) -> LayerCall | None:
    """The flatten or channel shuffle layer a module call computes; None for other modules."""
    inputs = [node.args[0]]
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise UnsupportedOperator("flatten", str(node.target), "only flatten(start_dim=1) is supported")
        return Op.FLATTEN, {"inputs": inputs}
    if isinstance(module, nn.ChannelShuffle):
        return Op.CHANNEL_SHUFFLE, {"inputs": inputs, "groups": int(module.groups)}
    return None


def function_layer(_g: GraphState, node: fx.Node) -> LayerCall | None:
    """The flatten or channel shuffle layer a function call computes; None for other functions."""
    if node.target is torch.flatten:
        return _flatten(node, node.args[1:], node.kwargs)
    if node.target in _CHANNEL_SHUFFLE_FUNCTIONS:
        groups = bind(node, ("input", "groups"))["groups"]
        return Op.CHANNEL_SHUFFLE, {"inputs": [node.args[0]], "groups": int(groups)}
    return None


def method_layer(_g: GraphState, node: fx.Node) -> LayerCall | None:
    """The layer of `Tensor.flatten`; None for other methods."""
    if str(node.target) == "flatten":
        return _flatten(node, node.args[1:], node.kwargs)
    return None


def _flatten(node: fx.Node, args: Sequence[Any], kwargs: dict[str, Any]) -> LayerCall:
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    if start != 1 or end != -1:
        raise UnsupportedOperator(
            "flatten", node.name, f"only flatten(x, 1) is supported, got ({start}, {end})"
        )
    return Op.FLATTEN, {"inputs": [node.args[0]]}


def _mean(g: GraphState, node: fx.Node, source: fx.Node) -> None:
    """A mean over H and W: adaptive average pooling, then a flatten unless the dims are kept."""
    params = ("input", "dim", "keepdim") if node.op == "call_function" else ("self", "dim", "keepdim")
    bound = bind(node, params)
    dim = bound.get("dim")
    shape = tensor_shape(source)
    dims = (dim,) if isinstance(dim, int) else tuple(dim or ())
    if len(shape) != 4 or source.name in g.channels_last or sorted(int(d) % 4 for d in dims) != [2, 3]:
        raise UnsupportedOperator(
            "mean",
            node.name,
            f"only a mean over H and W (dims 2, 3) is supported, got dim={dim} of {shape}",
        )
    pooled_shape = (shape[0], shape[1], 1, 1)
    pooled = g.add_layer(node.name, Op.ADAPTIVE_AVGPOOL2D, [g.ref(source)], shape, pooled_shape)
    if bound.get("keepdim", False):
        g.alias[node.name] = pooled
        return
    flat_shape = (shape[0], shape[1])
    g.alias[node.name] = g.add_layer(f"{node.name}:flatten", Op.FLATTEN, [pooled], pooled_shape, flat_shape)


def _split(g: GraphState, node: fx.Node, source: fx.Node) -> None:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    rank = len(tensor_shape(source))
    if source.name in g.channels_last or dim not in (1, 1 - rank):
        raise UnsupportedOperator(
            str(getattr(node.target, "__name__", node.target)),
            node.name,
            f"only a split along channels (dim=1) of an (N, C, H, W) tensor is supported, got dim={dim}",
        )
    metas = node.meta.get("tensor_meta")
    spans, offset = [], 0
    for meta in metas:  # type: ignore[union-attr]
        channels = int(meta.shape[1])
        spans.append((offset, channels))
        offset += channels
    g.parts[node.name] = Parts(source, tuple(spans))


def _getitem(g: GraphState, node: fx.Node) -> bool:
    container, index = node.args[0], node.args[1]
    if not isinstance(container, fx.Node):
        return False
    if container.name in g.parts:
        parts = g.parts[container.name]
        offset, channels = parts.spans[int(index)]  # type: ignore[arg-type]
        _slice(g, node, parts.source, offset, channels)
        return True
    if container.name in g.scalars:
        g.scalars.add(node.name)
        return True
    if container.name in g.attention_outputs:
        if index != 0:
            raise UnsupportedOperator("MultiheadAttention", node.name, "attention weights are not supported")
        g.alias[node.name] = g.alias[container.name]
        g.channels_last.add(node.name)
        return True
    if container.name in g.channels_last and len(tensor_shape(container)) == 3:
        if index != (slice(None), 0):
            raise UnsupportedOperator(
                "getitem",
                node.name,
                f"only the first token (x[:, 0]) of a token sequence can be read, got index {index!r}",
            )
        g.alias[node.name] = g.add_layer(
            node.name,
            Op.TOKEN_SELECT,
            [g.alias[container.name]],
            g.ir_shape(container),
            tensor_shape(node),
        )
        return True
    span = _channel_slice(index, tensor_shape(container))
    if span is None:
        raise UnsupportedOperator(
            "getitem",
            node.name,
            f"only a contiguous slice of the channels (x[:, a:b]) is supported, got index {index!r}",
        )
    _slice(g, node, container, *span)
    return True


def _channel_slice(index: Any, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(offset, channels) when `index` reads a contiguous range of the channels of a tensor of `shape`."""
    items = index if isinstance(index, tuple) else (index,)
    if len(shape) < 2 or len(items) < 2 or items[0] != slice(None):
        return None
    channels = items[1]
    full = slice(None)
    if not isinstance(channels, slice) or any(item not in (full, Ellipsis) for item in items[2:]):
        return None
    if not all(
        bound is None or isinstance(bound, int) for bound in (channels.start, channels.stop, channels.step)
    ):
        return None
    start, stop, step = channels.indices(shape[1])
    if step != 1 or stop <= start:
        return None
    return start, stop - start


def _slice(g: GraphState, node: fx.Node, source: fx.Node, offset: int, channels: int) -> None:
    in_shape = g.ir_shape(source)
    if offset == 0 and channels == in_shape[1]:
        g.same_tensor(node, source)
        return
    ref = g.ref(source)
    g.alias[node.name] = g.add_layer(
        node.name, Op.SLICE, [ref], in_shape, tensor_shape(node), channel_offset=offset
    )


def _reshape(g: GraphState, node: fx.Node, source: fx.Node) -> bool:
    in_shape = tensor_shape(source)
    out_shape = tensor_shape(node)
    grouped = g.grouped.get(source.name)
    if grouped is not None:
        _reshape_grouped(g, node, grouped, out_shape)
        return True
    if source.name in g.channels_last or source.name not in g.alias:
        return False
    if out_shape == in_shape:
        g.same_tensor(node, source)
        return True
    if len(in_shape) == 4 and len(out_shape) == 5:
        n, c, h, w = in_shape
        if out_shape[0] == n and out_shape[3:] == (h, w) and out_shape[1] * out_shape[2] == c:
            g.grouped[node.name] = GroupedChannels(g.ref(source), out_shape[1], False)
            return True
    if len(in_shape) == 4 and out_shape == (in_shape[0], numel(in_shape[1:])):
        g.alias[node.name] = g.add_layer(node.name, Op.FLATTEN, [g.ref(source)], in_shape, out_shape)
        return True
    if len(in_shape) == 4 and out_shape == (*in_shape[:2], in_shape[2] * in_shape[3]):
        g.alias[node.name] = g.add_layer(node.name, Op.TOKENS, [g.ref(source)], in_shape, g.ir_shape(node))
        return True
    raise UnsupportedOperator(
        f"Tensor.{node.target}" if node.op == "call_method" else str(node.target),
        node.name,
        f"only a flatten or the views of a channel shuffle are supported, got {in_shape} -> {out_shape}",
    )


def _reshape_grouped(
    g: GraphState, node: fx.Node, grouped: GroupedChannels, out_shape: tuple[int, ...]
) -> None:
    """The 5-D view of a channel shuffle reshaped back to 4-D: the same tensor, or the shuffle."""
    if len(out_shape) != 4:
        raise UnsupportedOperator(
            str(node.target),
            node.name,
            "a 5-D view of the channels must be reshaped back to (N, C, H, W)",
        )
    if not grouped.transposed:  # viewed and viewed back: the same tensor
        g.alias[node.name] = grouped.source
        return
    shape = (out_shape[0], out_shape[1], out_shape[2], out_shape[3])
    g.alias[node.name] = g.add_layer(
        node.name, Op.CHANNEL_SHUFFLE, [grouped.source], shape, shape, groups=grouped.groups
    )


def _permutation(node: fx.Node, rank: int) -> tuple[int, ...]:
    """The axis order a permute or transpose node gives a tensor of `rank`."""
    args: list[Any] = list(node.args[1:])
    dims: tuple[Any, ...] = (
        tuple(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else tuple(args)
    )
    if not dims:
        kwargs: dict[str, Any] = dict(node.kwargs)
        dims = tuple(kwargs.get("dims", ())) or (kwargs.get("dim0"), kwargs.get("dim1"))
    if node.target in ("transpose",) or node.target is torch.transpose:
        a, b = (int(d) % rank for d in dims)
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
        dims = tuple(order)
    return tuple(int(d) % rank for d in dims)


def _permute(g: GraphState, node: fx.Node, source: fx.Node) -> None:
    rank = len(tensor_shape(source))
    perm = _permutation(node, rank)
    if source.name in g.partitions:
        raise UnsupportedOperator(
            "permute", node.name, "a MaxViT partition is only undone by its WindowDepartition"
        )
    grouped = g.grouped.get(source.name)
    if grouped is not None and perm == (0, 2, 1, 3, 4):
        g.grouped[node.name] = GroupedChannels(grouped.source, grouped.groups, not grouped.transposed)
        return
    if source.name in g.alias and rank == 4:
        if source.name not in g.channels_last and perm == (0, 2, 3, 1):
            g.alias[node.name] = g.alias[source.name]
            g.channels_last.add(node.name)
            return
        if source.name in g.channels_last and perm == (0, 3, 1, 2):
            g.alias[node.name] = g.alias[source.name]
            return
        if perm == (0, 1, 2, 3):
            g.same_tensor(node, source)
            return
    if source.name in g.alias and rank == 3 and perm == (0, 2, 1):  # (N, C, L) <-> (N, L, C)
        g.alias[node.name] = g.alias[source.name]
        if source.name not in g.channels_last:
            g.channels_last.add(node.name)
        return
    raise UnsupportedOperator(
        "permute",
        node.name,
        f"only (N, C, H, W) <-> (N, H, W, C) permutes and channel shuffles are supported, got {perm}",
    )
