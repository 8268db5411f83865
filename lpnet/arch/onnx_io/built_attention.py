"""The IR's own attention module (`lpnet.arch.build.WindowAttention`) as torch.onnx.export writes it:
one `attention` layer, so that an IR network exported to ONNX reads back as itself.

For an (N, C, H, W) map, windows of wh x ww positions (L = wh ww) dilated by (dh, dw), h heads of
d = C / h features and a shift (sh, sw), the exported module is:

    Transpose(0 2 3 1)                                                (N, H, W, C)
    if padded: Pad at the end of H and W, to whole dilated windows    (N, pH, pW, C)
    if shifted: roll by (-sh, -sw): Concat(Slice(a:), Slice(:a)) along H, then along W
    Reshape (N, pH / (wh dh), wh, dh, pW / (ww dw), ww, dw, C),
    Transpose(0 1 3 4 6 2 5 7), Reshape: the B windows                (B, L, C)
    MatMul by W_qkv, [Add of b_qkv]                                   (B, L, 3C)
    Reshape (B, L, 3, h, d), Transpose(2 0 3 1 4), Split on axis 0    (1, B, h, L, d) each
    each Squeeze of axis 0: q, k, v                                   (B, h, L, d)
    q Mul, k Transpose(0 1 3 2) and Mul: scales whose product is 1 / sqrt(d)
    MatMul(q, k), [Add of the position bias (1, h, L, L)]             (B, h, L, L)
    Softmax over the last axis, MatMul by v                           (B, h, L, d)
    Transpose(0 2 1 3), Reshape, MatMul by W_out, [Add of b_out]      (B, L, C)
    Reshape (N, pH / (wh dh), dh, pW / (ww dw), dw, wh, ww, C),
    Transpose(0 1 5 2 3 6 4 7), Reshape                               (N, pH, pW, C)
    if shifted: roll back by (sh, sw)
    Slice of H, Slice of W, Transpose(0 3 1 2)                        (N, C, H, W)

It is followed from its MatMul of q and k (`match_attention`) with the walk of `subgraphs`, every
node's operator, attributes, constants and output shape checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion
from lpnet.arch.onnx_io.nodes import Attributes, node_name, node_scope
from lpnet.arch.onnx_io.subgraphs import GraphIndex, Subgraph, SubgraphWalk
from lpnet.errors import UnsupportedOperator

_SCALE_TOLERANCE = 1e-3
_CHANNELS_LAST = (0, 2, 3, 1)
_CHANNELS_FIRST = (0, 3, 1, 2)
_WINDOWS = (0, 1, 3, 4, 6, 2, 5, 7)
_MAP = (0, 1, 5, 2, 3, 6, 4, 7)
_HEADS = (2, 0, 3, 1, 4)


@dataclass(frozen=True)
class _Windows:
    """The map an attention reads, and how it is rolled and split into windows."""

    source: str
    shape: tuple[int, ...]  # (N, H, W, C), once put channels last
    blocks: tuple[int, ...]  # (N, pH / (wh dh), wh, dh, pW / (ww dw), ww, dw, C)
    shift: tuple[int, int]
    channels_last: bool  # `source` is the map channels last, (N, H, W, C)


def is_candidate(index: GraphIndex, scores: onnx.NodeProto) -> bool:
    """Whether the MatMul `scores` multiplies scaled keys, as the module's attention does (Swin's
    scales its queries only): the pattern `match_attention` checks."""
    keys = index.producer.get(scores.input[1]) if len(scores.input) == 2 else None
    return keys is not None and index.graph.node[keys].op_type == "Mul"


def match_attention(state: Conversion, index: GraphIndex, scores: int) -> Subgraph:
    """The module's attention whose MatMul of q and k is node `scores`; a Mismatch naming the first
    node that differs from the pattern."""
    return _BuiltAttention(state, index, scores, "attention of lpnet's attention module").match()


class _BuiltAttention(SubgraphWalk):
    """One exported attention module, followed from its MatMul of q and k."""

    def match(self) -> Subgraph:
        scores = self.start
        query_scale = self.producer(scores, scores.input[0], {"Mul"})
        key_scale = self.producer(scores, scores.input[1], {"Mul"})
        queries, query_factor = self.with_constant(query_scale)
        keys_transposed, key_factor = self.with_constant(key_scale)
        keys = self.producer(key_scale, keys_transposed, {"Transpose"})
        self.perm(keys, (0, 1, 3, 2))
        query_heads = self.producer(query_scale, queries, {"Squeeze"})
        split = self._split_part(query_heads, 0, None)
        self._split_part(self.producer(keys, keys.input[0], {"Squeeze"}), 1, split)
        shape = self.out_shape(query_heads)
        if len(shape) != 4 or min(shape) < 1:
            self.refuse(query_heads, f"expected the queries split into heads (B, h, L, d), got {shape}")
        batch, heads, length, head_features = shape
        scale = self.number(query_scale, query_factor) * self.number(key_scale, key_factor)
        expected = head_features**-0.5
        if abs(scale - expected) > _SCALE_TOLERANCE * expected:
            self.refuse(key_scale, f"the scores are scaled by {scale}, expected 1 / sqrt({head_features})")
        channels = heads * head_features
        moved = self.producer(split, split.input[0], {"Transpose"})
        self.perm(moved, _HEADS)
        stacked = self.producer(moved, moved.input[0], {"Reshape"})
        self.shape(stacked, (batch, length, 3, heads, head_features))
        projection = self.producer(stacked, stacked.input[0], {"Add", "MatMul"})
        bias = projection.op_type == "Add"
        if bias:
            product, bias_value = self.with_constant(projection)
            self.constant(projection, bias_value, (3 * channels,))
            projection = self.producer(projection, product, {"MatMul"})
        self.constant(projection, projection.input[1], (channels, 3 * channels))
        self.shape(projection, (batch, length, 3 * channels))
        windows = self._windows(projection, length, channels)
        node = scores
        self.shape(node, (batch, heads, length, length))
        position_bias = self._read_by(node, "Add")
        if position_bias:
            node = self.consumer(node, {"Add"})
            self.constant(node, self.with_constant(node)[1], (1, heads, length, length))
        softmax = self.consumer(node, {"Softmax"})
        if self.attribute(softmax, "axis", -1) % 4 != 3:
            self.refuse(softmax, "expected a softmax over the last axis")
        context = self.consumer(softmax, {"MatMul"})
        self._split_part(self.producer(context, context.input[1], {"Squeeze"}), 2, split)
        node = self.consumer(context, {"Transpose"})
        self.perm(node, (0, 2, 1, 3))
        node = self.consumer(node, {"Reshape"})
        self.shape(node, (batch, length, channels))
        node = self.consumer(node, {"MatMul"})
        self.constant(node, node.input[1], (channels, channels))
        if bias:
            node = self.consumer(node, {"Add"})
            self.constant(node, self.with_constant(node)[1], (channels,))
        self.shape(node, (batch, length, channels))
        end, output_channels_last = self._map(node, windows)
        fields = {
            "groups": heads,
            "kernel": (windows.blocks[2], windows.blocks[5]),
            "shift": windows.shift,
            "dilation": (windows.blocks[3], windows.blocks[6]),
            "bias": bias,
            "position_bias": position_bias,
        }
        convert = partial(
            _add_layer, windows=windows, output_channels_last=output_channels_last, fields=fields
        )
        return self.close(windows.source, end, convert)

    def _split_part(self, squeeze: onnx.NodeProto, part: int, split: onnx.NodeProto | None) -> onnx.NodeProto:
        """`squeeze` drops axis 0 of output `part` (q 0, k 1, v 2) of the Split of the stacked q, k and v
        (of `split` when it is known); the Split."""
        if self.axes(squeeze) != (0,):
            self.refuse(squeeze, "expected a Squeeze of axis 0")
        found = self.producer(squeeze, squeeze.input[0], {"Split"})
        if split is not None and found.output[0] != split.output[0]:
            self.refuse(squeeze, "expected q, k and v split from one tensor")
        outputs = list(found.output)
        shapes = {self.state.shapes.get(out, ())[:1] for out in outputs}
        if self.attribute(found, "axis", 0) != 0 or len(outputs) != 3 or shapes != {(1,)}:
            self.refuse(found, "expected q, k and v split apart along axis 0")
        if outputs.index(squeeze.input[0]) != part:
            self.refuse(squeeze, f"expected output {part} of the Split (q, k, v)")
        return found

    def _windows(self, projection: onnx.NodeProto, length: int, channels: int) -> _Windows:
        """The map the windows the qkv projection reads are cut from: its padding, rolls and split."""
        merged = self.producer(projection, projection.input[0], {"Reshape"})
        order = self.producer(merged, merged.input[0], {"Transpose"})
        self.perm(order, _WINDOWS)
        split = self.producer(order, order.input[0], {"Reshape"})
        blocks = self.out_shape(split)
        if len(blocks) != 8:
            self.refuse(split, f"expected the map split into 8 dimensions (dilated windows), got {blocks}")
        n, rows, wh, dh, columns, ww, dw, map_channels = blocks
        if wh * ww != length or map_channels != channels:
            self.refuse(split, f"its windows {(wh, ww)} of {map_channels} channels are not the attention's")
        self.shape(merged, (n * rows * dh * columns * dw, length, channels))
        padded = (rows * wh * dh, columns * ww * dw)
        value = split.input[0]
        if self.state.shapes.get(value) != (n, *padded, channels):
            self.refuse(split, f"its input {value!r} must be the padded map {(n, *padded, channels)}")
        shift = (0, 0)
        if self._produced_by(value, "Concat"):
            shift, _, value = self.map_roll(self.producer(split, value, {"Concat"}), padded)
        if self._produced_by(value, "Pad"):
            pad = self.producer(split, value, {"Pad"})
            self.zero_end_padding(pad, (wh * dh, ww * dw))
            value = pad.input[0]
        shape = self.state.shapes.get(value, ())
        if len(shape) != 4:
            self.refuse(split, f"expected windows of a map (N, H, W, C), got windows of {value!r} {shape}")
        if self._produced_by(value, "Transpose", _CHANNELS_LAST):
            value = self.producer(split, value, {"Transpose"}).input[0]
            return _Windows(value, shape, blocks, shift, channels_last=False)
        # The exporter drops the Transpose when the map was put back channels first just before.
        return _Windows(value, shape, blocks, shift, channels_last=True)

    def _produced_by(self, value: str, op_type: str, perm: tuple[int, ...] | None = None) -> bool:
        """Whether `value` is computed by a node of `op_type` (a Transpose by `perm`)."""
        index = self.index.producer.get(value)
        if index is None or self.index.graph.node[index].op_type != op_type:
            return False
        node = self.index.graph.node[index]
        attrs = Attributes(node, node_name(node))
        return perm is None or ("perm" in attrs and attrs.get_axes("perm") == perm)

    def _map(self, node: onnx.NodeProto, windows: _Windows) -> tuple[onnx.NodeProto, bool]:
        """The windows put back into the map, rolled back, cropped to H and W and put channels first
        again: the last node, and whether its output is the map channels last."""
        n, rows, wh, dh, columns, ww, dw, channels = windows.blocks
        padded = (rows * wh * dh, columns * ww * dw)
        node = self.consumer(node, {"Reshape"})
        self.shape(node, (n, rows, dh, columns, dw, wh, ww, channels))
        node = self.consumer(node, {"Transpose"})
        self.perm(node, _MAP)
        node = self.consumer(node, {"Reshape"})
        self.shape(node, (n, *padded, channels))
        if windows.shift != (0, 0):
            node = self.map_rolled_back(node, padded, windows.shift)
        _, height, width, _ = windows.shape
        for axis, size in ((1, height), (2, width)):
            node = self.consumer(node, {"Slice"})
            if self.slice_of(node) != (axis, 0, size, 1):
                self.refuse(node, f"expected the map cropped to its size {(height, width)} along axis {axis}")
        if not self._read_by(node, "Transpose", _CHANNELS_FIRST):
            # The exporter drops the Transpose when the map is put channels last just after.
            return node, True
        node = self.consumer(node, {"Transpose"})
        self.shape(node, (n, channels, height, width))
        return node, False

    def _read_by(self, node: onnx.NodeProto, op_type: str, perm: tuple[int, ...] | None = None) -> bool:
        """Whether the output of `node` is read by one node only, an `op_type` (a Transpose by `perm`)."""
        readers = self.index.readers.get(node.output[0], [])
        return len(readers) == 1 and self._produced_by(
            self.index.graph.node[readers[0]].output[0], op_type, perm
        )


def _add_layer(
    state: Conversion,
    node: onnx.NodeProto,
    windows: _Windows,
    output_channels_last: bool,
    fields: dict[str, Any],
) -> None:
    """The `attention` layer of a matched module reading the map `windows.source`."""
    source = windows.source
    in_layout = source in state.channels_last and source not in state.partitions
    if source not in state.alias or in_layout != windows.channels_last or source in state.channels_swapped:
        layout = "(N, H, W, C)" if windows.channels_last else "(N, C, H, W)"
        raise UnsupportedOperator(
            "attention", node_scope(node), f"its input {source!r} must be an {layout} map"
        )
    shape = state.ir_layer_shape(source, node)
    out = node.output[0]
    state.alias[out] = state.add_layer(
        node_scope(node), Op.ATTENTION, [state.alias[source]], shape, shape, fields
    )
    if output_channels_last:
        state.channels_last.add(out)
