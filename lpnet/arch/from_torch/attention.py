"""Attention: nn.MultiheadAttention over a token sequence, and torchvision's Swin (windowed, shifted)
and MaxViT (block and grid partitions) attention, with MaxViT's partitions and Swin's patch merging."""

from __future__ import annotations

import sys
from typing import Any

import torch.fx as fx
from torch import nn

from lpnet.arch.from_torch.nodes import bind, hw, pair, tensor_shape
from lpnet.arch.from_torch.state import GraphState, LayerCall, Partition
from lpnet.arch.ir import Op
from lpnet.errors import UnsupportedOperator

# torchvision's Swin computes its windowed attention and its patch merging in functions that torch.fx
# keeps as single calls (torch.fx.wrap).
_SWIN_ATTENTION_PARAMETERS = (
    "input",
    "qkv_weight",
    "proj_weight",
    "relative_position_bias",
    "window_size",
    "num_heads",
    "shift_size",
    "attention_dropout",
    "dropout",
    "qkv_bias",
    "proj_bias",
    "logit_scale",
    "training",
)


def _swin_functions() -> tuple[Any, Any]:
    """torchvision's (shifted_window_attention, _patch_merging_pad), or Nones where torchvision's Swin
    was never imported: no Swin model can exist in such a process, and importing torchvision to
    find that out would cost every trace seconds."""
    swin = sys.modules.get("torchvision.models.swin_transformer")
    if swin is None:
        return None, None
    return swin.shifted_window_attention, swin._patch_merging_pad


def maxvit_modules() -> tuple[type[nn.Module], ...]:
    """torchvision MaxViT's (WindowPartition, SwapAxes, WindowDepartition, its attention), or () where
    torchvision's MaxViT was never imported (no MaxViT model can exist then)."""
    maxvit = sys.modules.get("torchvision.models.maxvit")
    if maxvit is None:
        return ()
    return (
        maxvit.WindowPartition,
        maxvit.SwapAxes,
        maxvit.WindowDepartition,
        maxvit.RelativePositionalMultiHeadAttention,
    )


def module_layer(g: GraphState, node: fx.Node, module: nn.Module) -> LayerCall | None:
    """The layer of MaxViT's attention; None for other modules."""
    leaves = maxvit_modules()
    if leaves and isinstance(module, leaves[3]):
        return _maxvit_attention(g, node, module)
    return None


def function_layer(g: GraphState, node: fx.Node) -> LayerCall | None:
    """The layer of Swin's windowed attention or patch merging; None for other functions."""
    swin_attention, swin_patch_merging = _swin_functions()
    if node.target is not None and node.target is swin_attention:
        return _swin_attention(g, node)
    if node.target is not None and node.target is swin_patch_merging:
        return Op.SPACE_TO_DEPTH, {"inputs": [node.args[0]]}
    return None


def multihead_attention(g: GraphState, node: fx.Node, module: nn.MultiheadAttention) -> None:
    """Self-attention of a batch-first token sequence: an `attention` layer over all its positions."""
    bound = bind(node, ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"))
    query = bound.get("query")
    refused = None
    if not module.batch_first:
        refused = "only batch_first=True is supported"
    elif bound.get("key") is not query or bound.get("value") is not query:
        refused = "only self-attention (query, key and value the same tensor) is supported"
    elif any(bound.get(m) is not None for m in ("key_padding_mask", "attn_mask")):
        refused = "attention masks are not supported"
    elif module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
        refused = "only the standard projections (no add_bias_kv, add_zero_attn or kdim/vdim) are supported"
    elif not isinstance(query, fx.Node) or query.name not in g.channels_last:
        refused = "only a (N, L, C) token sequence is supported as the input"
    if refused:
        raise UnsupportedOperator("MultiheadAttention", str(node.target), refused)
    assert isinstance(query, fx.Node)
    shape = g.ir_shape(query)
    g.alias[node.name] = g.add_layer(
        str(node.target),
        Op.ATTENTION,
        [g.alias[query.name]],
        shape,
        shape,
        groups=module.num_heads,
        kernel=hw(shape),
        bias=module.in_proj_bias is not None,
    )
    g.attention_outputs.add(node.name)


def maxvit_partition(g: GraphState, node: fx.Node, module: nn.Module) -> bool:
    """MaxViT's window partition, axis swap and departition: views of the map, not layers.

    False when `module` is none of them.
    """
    leaves = maxvit_modules()
    if not leaves or not isinstance(module, leaves[:3]):
        return False
    partition_type, swap_type, _ = leaves[:3]
    source = node.args[0]
    assert isinstance(source, fx.Node)
    where = str(node.target)
    if isinstance(module, partition_type):
        shape = tensor_shape(source)
        size = int(node.args[1])  # type: ignore[arg-type]
        if source.name in g.channels_last or len(shape) != 4 or shape[2] % size or shape[3] % size:
            raise UnsupportedOperator(
                "WindowPartition", where, f"only (N, C, H, W) maps divisible by {size} are supported"
            )
        g.alias[node.name] = g.ref(source)
        g.partitions[node.name] = Partition((shape[0], shape[1], shape[2], shape[3]), size, False)
        g.channels_last.add(node.name)
        return True
    partition = g.partitions.get(source.name)
    if partition is None:
        raise UnsupportedOperator(type(module).__name__, where, "only on a MaxViT window partition")
    if isinstance(module, swap_type):
        if sorted((int(module.a) % 4, int(module.b) % 4)) != [1, 2]:  # type: ignore[arg-type]
            raise UnsupportedOperator("SwapAxes", where, "only a swap of the groups and positions axes")
        g.same_tensor(node, source)
        g.partitions[node.name] = Partition(partition.shape, partition.size, not partition.swapped)
        return True
    if partition.swapped or int(node.args[1]) != partition.size:  # type: ignore[arg-type]
        raise UnsupportedOperator("WindowDepartition", where, "it must undo the partition it reads")
    g.alias[node.name] = g.alias[source.name]
    return True


def _maxvit_attention(g: GraphState, node: fx.Node, module: nn.Module) -> LayerCall:
    """MaxViT's attention over a partition's positions: a windowed or dilated `attention` layer."""
    source = node.args[0]
    assert isinstance(source, fx.Node)
    partition = g.partitions.get(source.name)
    if partition is None:
        raise UnsupportedOperator(
            "RelativePositionalMultiHeadAttention", str(node.target), "only on a MaxViT window partition"
        )
    _, _, h, w = partition.shape
    p = partition.size
    window, dilation = ((h // p, w // p), (p, p)) if partition.swapped else ((p, p), (1, 1))
    return Op.ATTENTION, {
        "inputs": [source],
        "groups": int(module.n_heads),  # type: ignore[arg-type]
        "kernel": window,
        "dilation": dilation,
        "bias": module.to_qkv.bias is not None,  # type: ignore[union-attr]
        "position_bias": True,
    }


def _swin_attention(g: GraphState, node: fx.Node) -> LayerCall:
    """torchvision's shifted_window_attention: an `attention` layer with a window and a shift."""
    bound = bind(node, _SWIN_ATTENTION_PARAMETERS)
    source = bound["input"]
    if not isinstance(source, fx.Node) or source.name not in g.channels_last:
        raise UnsupportedOperator(
            "shifted_window_attention", node.name, "its input must be a channels-last (N, H, W, C) map"
        )
    _, h, w, _ = tensor_shape(source)
    window = pair(bound["window_size"])
    shift = list(pair(bound.get("shift_size", 0)))
    # As torchvision does: no shift along a dimension that one window covers.
    for i, size in enumerate((h, w)):
        if window[i] >= -(-size // window[i]) * window[i]:
            shift[i] = 0
    return Op.ATTENTION, {
        "inputs": [source],
        "groups": int(bound["num_heads"]),
        "kernel": window,
        "shift": tuple(shift),
        "bias": bound.get("qkv_bias") is not None,
        "position_bias": bound.get("relative_position_bias") is not None,
    }
