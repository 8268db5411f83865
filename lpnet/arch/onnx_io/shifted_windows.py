"""Swin's shifted-window attention and patch merging, as torch.onnx.export writes torchvision's
`shifted_window_attention` and `_patch_merging_pad`: one `attention` and one `space_to_depth` layer.

For a channels-last (N, H, W, C) map x, windows of wh x ww positions (L = wh ww), h heads of
d = C / h features and a shift (sh, sw), the exported attention is:

    Pad(x) at the end of H and W, to whole windows                 (N, pH, pW, C)
    if shifted: roll by (-sh, -sw): Concat(Slice(a:), Slice(:a)) along H, then along W
    Reshape, Transpose(0 1 3 2 4 5), Reshape: the nW windows         (N nW, L, C)
    MatMul by W_qkv, Add of b_qkv                                    (N nW, L, 3C)
    Reshape, Transpose(2 0 3 1 4); Gather(0), (1), (2): q, k, v      (N nW, h, L, d) each
    Swin v1: q Mul by 1 / sqrt(d); Swin v2 (cosine attention): q and k divided by their L2 norms
    k Transpose(0 1 3 2), MatMul(q, k)                               (N nW, h, L, L)
    Swin v2: Mul by a learned scale per head
    Add of the relative position bias                                (1, h, L, L)
    if shifted: Reshape (N, nW, h, L, L), Add of the mask (1, nW, 1, L, L), Reshape back
    Softmax over the last axis, MatMul by v                          (N nW, h, L, d)
    Transpose(0 2 1 3), Reshape, MatMul by W_out, Add of b_out        (N nW, L, C)
    Reshape, Transpose(0 1 3 2 4 5), Reshape: the map                (N, pH, pW, C)
    if shifted: roll back by (sh, sw)
    Slice of H, Slice of W                                           (N, H, W, C)

It is followed from its MatMul of q and k (`match_attention`). Its constants are checked by shape
(the weights, biases, position biases and masks keep no values once above the folded size). The IR's
`attention` has no field for Swin v2's cosine attention: it reads as the layer the traced module
gives, whose cost counts the projections and the products, not the normalisations.

Patch merging (`match_patch_merging`) pads (N, H, W, C) with zeros to an even H and W, slices the
four quarters x[:, r::2, c::2] and concatenates them along the channels: (N, H / 2, W / 2, 4C). The
IR's own module does the same channels first, on (N, C, H, W), with a Pad only for an odd H or W.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion
from lpnet.arch.onnx_io.nodes import node_scope
from lpnet.arch.onnx_io.subgraphs import GraphIndex, Subgraph, SubgraphWalk
from lpnet.errors import UnsupportedOperator

_SCALE_TOLERANCE = 1e-3
_EPSILON_BOUND = 1e-3  # the largest lower bound of the norm read as F.normalize's epsilon
# The (row, column) of the first position of each quarter, in the order they are concatenated: the
# order of the IR's space_to_depth, which torchvision's Swin and the IR's module share.
_QUARTERS = [(0, 0), (1, 0), (0, 1), (1, 1)]


@dataclass(frozen=True)
class _Heads:
    """The q, k and v of a windowed attention, stacked (3, N nW, h, L, d), and their projection."""

    stacked: str
    heads: int
    length: int
    head_features: int
    bias: bool
    projection: onnx.NodeProto  # the MatMul of the windows by W_qkv


@dataclass(frozen=True)
class _Windows:
    """The map a windowed attention reads, and how it is padded, rolled and split into windows."""

    source: str
    shape: tuple[int, ...]  # (N, H, W, C)
    padded: tuple[int, int]  # (pH, pW)
    window: tuple[int, int]
    shift: tuple[int, int]
    rolled: bool


def match_attention(state: Conversion, index: GraphIndex, scores: int) -> Subgraph:
    """The Swin attention whose MatMul of q and k is node `scores`; a Mismatch naming the first node
    that differs from the pattern."""
    return _WindowAttention(state, index, scores, "shifted-window attention").match()


def match_patch_merging(state: Conversion, index: GraphIndex, concat: int) -> Subgraph:
    """The patch merging whose Concat of the four quarters is node `concat`, or a Mismatch.

    Swin's computes channels last and always pads; the IR's module (`lpnet.arch.build.SpaceToDepth`)
    computes channels first and pads only an odd H or W.
    """
    walk = SubgraphWalk(state, index, concat, "patch merging")
    node = walk.start
    channel_axis = walk.attribute(node, "axis", 0) % 4
    if channel_axis not in (1, 3) or len(node.input) != 4:
        walk.refuse(node, "expected the four quarters of a map concatenated along its channels")
    channels_first = channel_axis == 1
    source = _quartered(walk, node, (2, 3) if channels_first else (1, 2))
    if not channels_first or _pads_odd_map(state, index, source):
        pad = walk.producer(node, source, {"Pad"})
        shape = walk.zero_end_padding(pad, (2, 2), channels_first)
        source = pad.input[0]
    else:
        shape = state.shapes.get(source, ())
        if len(shape) != 4:
            walk.refuse(node, f"expected the quarters of an (N, C, H, W) map, got {shape}")
    n, height, width, channels = (shape[0], *shape[2:], shape[1]) if channels_first else shape
    half = (-(-height // 2), -(-width // 2))
    quarter, merged = (n, channels, *half), (n, 4 * channels, *half)
    if not channels_first:
        quarter, merged = (n, *half, channels), (n, *half, 4 * channels)
    for value in node.input:
        walk.shape(walk.producer(node, value, {"Slice"}), quarter)
    walk.shape(node, merged)
    convert = partial(_add_layer, source=source, op=Op.SPACE_TO_DEPTH, channels_last=not channels_first)
    return walk.close(source, node, convert)


def _quartered(walk: SubgraphWalk, concat: onnx.NodeProto, axes: tuple[int, int]) -> str:
    """The map whose quarters `concat` stacks, each sliced along the rows, then along the columns
    (`axes`), every second position from its first one, in the order of `_QUARTERS`."""
    quarters, sources = [], set()
    for value in concat.input:
        columns = walk.producer(concat, value, {"Slice"})
        rows = walk.producer(columns, columns.input[0], {"Slice"})
        (row_axis, row, _, row_step), (column_axis, column, _, column_step) = map(
            walk.slice_of, (rows, columns)
        )
        if (row_axis, row_step, column_axis, column_step) != (axes[0], 2, axes[1], 2):
            walk.refuse(columns, "expected every second row, then every second column, of the padded map")
        quarters.append((row, column))
        sources.add(rows.input[0])
    if quarters != _QUARTERS or len(sources) != 1:
        walk.refuse(concat, f"expected the quarters {_QUARTERS} of one map, in this order, got {quarters}")
    return sources.pop()


def _pads_odd_map(state: Conversion, index: GraphIndex, value: str) -> bool:
    """Whether `value` is computed by a Pad of an (N, C, H, W) map of odd H or W: the padding of the
    IR's patch merging (a `pad` layer before it keeps an odd or even size as it is)."""
    producer = index.producer.get(value)
    if producer is None or index.graph.node[producer].op_type != "Pad":
        return False
    shape = state.shapes.get(index.graph.node[producer].input[0], ())
    return len(shape) == 4 and (shape[2] % 2 == 1 or shape[3] % 2 == 1)


class _WindowAttention(SubgraphWalk):
    """One Swin attention, followed from its MatMul of q and k."""

    def match(self) -> Subgraph:
        scores = self.start
        keys = self.producer(scores, scores.input[1], {"Transpose"})
        self.perm(keys, (0, 1, 3, 2))
        queries = self.producer(scores, scores.input[0], {"Mul", "Div"})
        cosine = queries.op_type == "Div"
        if cosine:
            query_heads = self._normalised(queries)
            key_heads = self._normalised(self.producer(keys, keys.input[0], {"Div"}))
        else:
            query_heads = self.producer(queries, self.with_constant(queries)[0], {"Gather"})
            key_heads = self.producer(keys, keys.input[0], {"Gather"})
        heads = self._heads(query_heads, key_heads)
        if not cosine:
            scale = self.number(queries, self.with_constant(queries)[1])
            expected = heads.head_features**-0.5
            if abs(scale - expected) > _SCALE_TOLERANCE * expected:
                self.refuse(queries, f"q is scaled by {scale}, expected 1 / sqrt({heads.head_features})")
        windows = self._windows(heads)
        end = self._attend(scores, heads, windows, cosine)
        fields = {
            "groups": heads.heads,
            "kernel": windows.window,
            "shift": windows.shift,
            "bias": heads.bias,
            "position_bias": True,
        }
        convert = partial(_add_layer, source=windows.source, op=Op.ATTENTION, fields=fields)
        return self.close(windows.source, end, convert)

    def _normalised(self, div: onnx.NodeProto) -> onnx.NodeProto:
        """The Gather of q or k that `div` divides by its L2 norm over the last axis (F.normalize)."""
        if len(div.input) != 2:
            self.refuse(div, "expected q or k divided by its norm")
        heads, norm = div.input
        expand = self.producer(div, norm, {"Expand"})
        self.shape(expand, self.state.shapes.get(heads, ()))
        clip = self.producer(expand, expand.input[0], {"Clip"})
        bounds = [value for value in clip.input[1:] if value]
        if clip.input[1:2] != bounds[:1] or len(bounds) != 1 or self.number(clip, bounds[0]) > _EPSILON_BOUND:
            self.refuse(clip, "expected the norm clamped from below only, by a small epsilon")
        reduce = self.producer(clip, clip.input[0], {"ReduceL2"})
        kept = self.attribute(reduce, "keepdims", 1)
        if reduce.input[0] != heads or self.axes(reduce) not in ((-1,), (3,)) or kept != 1:
            self.refuse(reduce, f"expected the L2 norm of {heads!r} over its last axis, the axis kept")
        return self.producer(div, heads, {"Gather"})

    def _heads(self, queries: onnx.NodeProto, keys: onnx.NodeProto) -> _Heads:
        """The stacked projections q and k are gathered from: (N nW, L, 3C) reshaped and transposed."""
        stacked = queries.input[0]
        self._gathered(queries, stacked, 0)
        self._gathered(keys, stacked, 1)
        moved = self.producer(queries, stacked, {"Transpose"})
        self.perm(moved, (2, 0, 3, 1, 4))
        shape = self.out_shape(moved)
        if len(shape) != 5 or shape[0] != 3:
            self.refuse(moved, f"expected q, k and v stacked as (3, N nW, h, L, d), got {shape}")
        _, windows, heads, length, head_features = shape
        split = self.producer(moved, moved.input[0], {"Reshape"})
        self.shape(split, (windows, length, 3, heads, head_features))
        projection = self.producer(split, split.input[0], {"Add", "MatMul"})
        channels = heads * head_features
        bias = projection.op_type == "Add"
        if bias:
            product, bias_value = self.with_constant(projection)
            self.constant(projection, bias_value, (3 * channels,))
            projection = self.producer(projection, product, {"MatMul"})
        self.constant(projection, projection.input[1], (channels, 3 * channels))
        self.shape(projection, (windows, length, 3 * channels))
        return _Heads(stacked, heads, length, head_features, bias, projection)

    def _gathered(self, node: onnx.NodeProto, stacked: str, index: int) -> None:
        """`node` is the Gather of q, k or v (`index` 0, 1 or 2) from `stacked` on axis 0."""
        if node.input[0] != stacked or self.attribute(node, "axis", 0) != 0:
            self.refuse(node, f"expected a Gather on axis 0 of {stacked!r}")
        if self.number(node, node.input[1]) != index:
            self.refuse(node, f"expected the Gather of index {index} (q, k, v) from the stacked projections")

    def _windows(self, heads: _Heads) -> _Windows:
        """The map, its padding, its rolls and its split into the windows the qkv projection reads."""
        merged = self.producer(heads.projection, heads.projection.input[0], {"Reshape"})
        order = self.producer(merged, merged.input[0], {"Transpose"})
        self.perm(order, (0, 1, 3, 2, 4, 5))
        split = self.producer(order, order.input[0], {"Reshape"})
        shape = self.out_shape(split)
        if len(shape) != 6:
            self.refuse(split, f"expected the map split as (N, pH / wh, wh, pW / ww, ww, C), got {shape}")
        n, rows, wh, columns, ww, channels = shape
        if wh * ww != heads.length or channels != heads.heads * heads.head_features:
            self.refuse(
                split, f"its windows {(wh, ww)} of {channels} channels are not those of the attention"
            )
        self.shape(merged, (n * rows * columns, wh * ww, channels))
        padded = (rows * wh, columns * ww)
        first = self.producer(split, split.input[0], {"Concat", "Pad"})
        pad, shift = first, (0, 0)
        if first.op_type == "Concat":
            shift, along_h, rolled = self.map_roll(first, padded)
            pad = self.producer(along_h, rolled, {"Pad"})
            if shift[0] >= wh or shift[1] >= ww:
                self.refuse(first, f"the shift {shift} must be below the window {(wh, ww)}")
        map_shape = self.zero_end_padding(pad, (wh, ww))
        return _Windows(pad.input[0], map_shape, padded, (wh, ww), shift, first.op_type == "Concat")

    def _attend(
        self, scores: onnx.NodeProto, heads: _Heads, windows: _Windows, cosine: bool
    ) -> onnx.NodeProto:
        """The nodes from the scores to the map again; the last one (the crop to H and W)."""
        n, height, width, channels = windows.shape
        count = (windows.padded[0] // windows.window[0]) * (windows.padded[1] // windows.window[1])
        h, length = heads.heads, heads.length
        self.shape(scores, (n * count, h, length, length))
        node = scores
        if cosine:
            node = self._with_constant(node, "Mul", (h, 1, 1))  # the learned scale of each head
        node = self._with_constant(node, "Add", (1, h, length, length))  # the relative position bias
        if windows.rolled:
            node = self.consumer(node, {"Reshape"})
            self.shape(node, (n, count, h, length, length))
            node = self._with_constant(node, "Add", (1, count, 1, length, length))  # the windows' mask
            node = self.consumer(node, {"Reshape"})
            self.shape(node, (n * count, h, length, length))
        softmax = self.consumer(node, {"Softmax"})
        if self.attribute(softmax, "axis", -1) % 4 != 3:
            self.refuse(softmax, "expected a softmax over the last axis")
        context = self.consumer(softmax, {"MatMul"})
        self._gathered(self.producer(context, context.input[1], {"Gather"}), heads.stacked, 2)
        node = self.consumer(context, {"Transpose"})
        self.perm(node, (0, 2, 1, 3))
        node = self.consumer(node, {"Reshape"})
        self.shape(node, (n * count, length, channels))
        node = self.consumer(node, {"MatMul"})
        self.constant(node, node.input[1], (channels, channels))
        if heads.bias:
            node = self._with_constant(node, "Add", (channels,))
        return self._reversed(node, windows)

    def _with_constant(self, node: onnx.NodeProto, op_type: str, dims: tuple[int, ...]) -> onnx.NodeProto:
        """The node of `op_type` computing on the output of `node` and a constant of `dims`."""
        found = self.consumer(node, {op_type})
        self.constant(found, self.with_constant(found)[1], dims)
        return found

    def _reversed(self, node: onnx.NodeProto, windows: _Windows) -> onnx.NodeProto:
        """The windows put back into the map, rolled back and cropped to H and W; the crop's last Slice."""
        n, height, width, channels = windows.shape
        (wh, ww), (padded_h, padded_w) = windows.window, windows.padded
        node = self.consumer(node, {"Reshape"})
        self.shape(node, (n, padded_h // wh, padded_w // ww, wh, ww, channels))
        node = self.consumer(node, {"Transpose"})
        self.perm(node, (0, 1, 3, 2, 4, 5))
        node = self.consumer(node, {"Reshape"})
        self.shape(node, (n, padded_h, padded_w, channels))
        if windows.rolled:
            node = self.map_rolled_back(node, windows.padded, windows.shift)
        crop = node
        for axis, size in ((1, height), (2, width)):
            crop = self.consumer(crop, {"Slice"})
            if self.slice_of(crop) != (axis, 0, size, 1):
                self.refuse(crop, f"expected the map cropped to its size {(height, width)} along axis {axis}")
        self.shape(crop, windows.shape)
        return crop


def _add_layer(
    state: Conversion,
    node: onnx.NodeProto,
    source: str,
    op: Op,
    fields: dict[str, Any] | None = None,
    channels_last: bool = True,
) -> None:
    """The `op` layer of a matched subgraph reading the map `source`, made at its last node: a
    channels-last (N, H, W, C) map, or an (N, C, H, W) one when not `channels_last`."""
    shape = state.shapes.get(source, ())
    layout = source in state.alias and source not in state.partitions and len(shape) == 4
    if channels_last:
        layout = layout and source in state.channels_last
    else:
        layout = layout and not state.is_permuted(source)
    if not layout:
        expected = "a channels-last (N, H, W, C)" if channels_last else "an (N, C, H, W)"
        raise UnsupportedOperator(op.value, node_scope(node), f"its input {source!r} must be {expected} map")
    n, channels, height, width = in_shape = state.ir_layer_shape(source, node)
    merged = (n, 4 * channels, -(-height // 2), -(-width // 2))
    out_shape = merged if op is Op.SPACE_TO_DEPTH else in_shape
    out = node.output[0]
    state.alias[out] = state.add_layer(
        node_scope(node), op, [state.alias[source]], in_shape, out_shape, dict(fields or {})
    )
    if channels_last:
        state.channels_last.add(out)
