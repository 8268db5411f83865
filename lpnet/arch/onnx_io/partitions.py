"""MaxViT's partitions and attention, as torch.onnx.export writes torchvision's WindowPartition,
SwapAxes, WindowDepartition and RelativePositionalMultiHeadAttention.

The partition of an (N, C, H, W) map into blocks of p x p positions,

    Reshape (N, C, H / p, p, W / p, p), Transpose(0 2 4 3 5 1), Reshape  (N, H W / p^2, p^2, C)
    grid attention: Transpose(0 2 1 3), the positions at one offset in every block first,

is the map viewed channels-last (`Conversion.partitions`), and its departition,

    [Transpose(0 2 1 3)], Reshape (N, H / p, W / p, p, p, C), Transpose(0 5 1 3 2 4), Reshape,

is the map again (`match_partition`). Layer norms, linears, activations and residual adds compute on a
partition as on any channels-last tensor. The attention over the positions axis of a partition
(N, G, P, C), with h heads of d = C / h features (`match_attention`, from its first Einsum),

    MatMul by W_qkv, Add of b_qkv                                     (N, G, P, 3C)
    Slice of q, k and v along the last axis                           (N, G, P, C) each
    each Reshape (N, G, P, h, d), Transpose(0 1 3 2 4)                 (N, G, h, P, d)
    k Mul by 1 / sqrt(C); Einsum "BGHID,BGHJD->BGHIJ" of q and k       (N, G, h, P, P)
    Add of the relative position bias                                 (1, h, P, P)
    Softmax over the last axis; Einsum "BGHIJ,BGHJD->BGHID" with v     (N, G, h, P, d)
    Transpose(0 1 3 2 4), Reshape, MatMul by W_out, Add of b_out       (N, G, P, C)

is one `attention` layer: over windows of p x p positions, or in the grid attention over windows
of H / p x W / p positions p apart (dilated by p).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import onnx

from lpnet.arch.from_torch.state import Partition
from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion
from lpnet.arch.onnx_io.nodes import Attributes, node_name, node_scope
from lpnet.arch.onnx_io.subgraphs import GraphIndex, Subgraph, SubgraphWalk
from lpnet.errors import UnsupportedOperator

_SCALE_TOLERANCE = 1e-3
_PARTITION = (0, 2, 4, 3, 5, 1)
_DEPARTITION = (0, 5, 1, 3, 2, 4)
_SWAP = (0, 2, 1, 3)
_HEADS_FIRST = (0, 1, 3, 2, 4)
# The two products, their letters named by first appearance: q k^T, and the weights times v.
_SCORES = "abcde,abcfe->abcdf"
_CONTEXT = "abcde,abcef->abcdf"


def match_partition(state: Conversion, index: GraphIndex, split: int) -> Subgraph:
    """The partition or departition whose first Reshape (to 6 dimensions) is node `split`, or a Mismatch."""
    walk = SubgraphWalk(state, index, split, "MaxViT partition")
    node = walk.start
    order = walk.consumer(node, {"Transpose"})
    attrs = Attributes(order, node_name(order))
    perm = attrs.get_axes("perm") if "perm" in attrs else ()
    in_shape, split_shape = state.shapes.get(node.input[0], ()), walk.out_shape(node)
    if perm == _PARTITION and len(in_shape) == 4:
        n, channels, height, width = in_shape
        size = split_shape[3]
        if size == 0 or split_shape != (n, channels, height // size, size, width // size, size):
            walk.refuse(
                node, f"expected the map split into blocks (N, C, H / p, p, W / p, p), got {split_shape}"
            )
        merged = walk.consumer(order, {"Reshape"})
        walk.shape(merged, (n, height * width // size**2, size**2, channels))
        end, swapped = merged, _swapped(walk, merged)
        if swapped:
            end = walk.consumer(merged, {"Transpose"})
        partition = Partition((n, channels, height, width), size, swapped)
        return walk.close(
            node.input[0], end, partial(_partition_view, source=node.input[0], partition=partition)
        )
    if perm == _DEPARTITION and len(split_shape) == 6:
        n, rows, columns, size, _, channels = split_shape
        if in_shape != (n, rows * columns, size * size, channels) or split_shape[4] != size:
            walk.refuse(
                node,
                f"expected a partition (N, G, p^2, C) split into blocks, got {in_shape} -> {split_shape}",
            )
        merged = walk.consumer(order, {"Reshape"})
        height, width = rows * size, columns * size
        walk.shape(merged, (n, channels, height, width))
        source, swapped = node.input[0], False
        before = index.producer.get(source)
        if before is not None and index.graph.node[before].op_type == "Transpose":
            swap = walk.producer(node, source, {"Transpose"})
            walk.perm(swap, _SWAP)
            source, swapped = swap.input[0], True
        partition = Partition((n, channels, height, width), size, swapped)
        return walk.close(source, merged, partial(_departition_view, source=source, partition=partition))
    walk.refuse(order, f"expected a Transpose with perm {list(_PARTITION)} or {list(_DEPARTITION)}")


def match_attention(state: Conversion, index: GraphIndex, scores: int) -> Subgraph:
    """The MaxViT attention whose Einsum of q and k is node `scores`, or a Mismatch naming the first
    node that differs from the pattern."""
    walk = SubgraphWalk(state, index, scores, "MaxViT attention")
    node = walk.start
    _einsum(walk, node, _SCORES)
    query_slice, shape = _head(walk, node, node.input[0])
    key_scale = walk.producer(node, node.input[1], {"Mul"})
    keys, scale_value = walk.with_constant(key_scale)
    key_slice, _ = _head(walk, key_scale, keys)
    n, groups, length, heads, head_features = shape
    channels = heads * head_features
    scale, expected = walk.number(key_scale, scale_value), channels**-0.5
    if abs(scale - expected) > _SCALE_TOLERANCE * expected:
        walk.refuse(key_scale, f"k is scaled by {scale}, expected 1 / sqrt({channels})")
    qkv = query_slice.input[0]
    for piece, part in ((query_slice, 0), (key_slice, 1)):
        _chunk(walk, piece, qkv, part, channels)
    projection = walk.producer(query_slice, qkv, {"Add", "MatMul"})
    bias = projection.op_type == "Add"
    if bias:
        product, bias_value = walk.with_constant(projection)
        walk.constant(projection, bias_value, (3 * channels,))
        projection = walk.producer(projection, product, {"MatMul"})
    walk.constant(projection, projection.input[1], (channels, 3 * channels))
    walk.shape(projection, (n, groups, length, 3 * channels))
    source = projection.input[0]
    end = _attend(walk, node, qkv, (n, groups, length, heads, head_features), bias)
    fields = {"groups": heads, "bias": bias, "position_bias": True}
    return walk.close(source, end, partial(_add_attention_layer, source=source, length=length, fields=fields))


def _swapped(walk: SubgraphWalk, merged: onnx.NodeProto) -> bool:
    """Whether the partition `merged` ends is read only by the swap of its two middle axes."""
    readers = walk.index.readers.get(merged.output[0], [])
    if len(readers) != 1:
        return False
    reader = walk.index.graph.node[readers[0]]
    attrs = Attributes(reader, node_name(reader))
    return reader.op_type == "Transpose" and "perm" in attrs and attrs.get_axes("perm") == _SWAP


def _einsum(walk: SubgraphWalk, node: onnx.NodeProto, expected: str) -> None:
    """`node` is an Einsum of two inputs whose equation, letters renamed, is `expected`."""
    equation = Attributes(node, node_name(node)).get_string("equation", "")
    letters: dict[str, str] = {}
    renamed = ""
    for char in equation.replace(" ", ""):
        renamed += letters.setdefault(char, chr(ord("a") + len(letters))) if char.isalpha() else char
    if renamed != expected or len(node.input) != 2:
        walk.refuse(node, f"expected an Einsum of two tensors with the equation {expected}, got {equation!r}")


def _head(walk: SubgraphWalk, node: onnx.NodeProto, value: str) -> tuple[onnx.NodeProto, tuple[int, ...]]:
    """The Slice of q, k or v that `value` (an input of `node`) splits into heads, and the heads'
    (N, G, P, h, d) shape."""
    transpose = walk.producer(node, value, {"Transpose"})
    walk.perm(transpose, _HEADS_FIRST)
    reshape = walk.producer(transpose, transpose.input[0], {"Reshape"})
    shape = walk.out_shape(reshape)
    if len(shape) != 5:
        walk.refuse(reshape, f"expected q, k or v split into heads (N, G, P, h, d), got {shape}")
    return walk.producer(reshape, reshape.input[0], {"Slice"}), shape


def _chunk(walk: SubgraphWalk, piece: onnx.NodeProto, qkv: str, part: int, channels: int) -> None:
    """`piece` is the Slice of q, k or v (`part` 0, 1 or 2) along the last axis of `qkv`."""
    if piece.input[0] != qkv or walk.slice_of(piece) != (3, part * channels, (part + 1) * channels, 1):
        walk.refuse(piece, f"expected the channels {part * channels} to {(part + 1) * channels} of {qkv!r}")


def _attend(
    walk: SubgraphWalk, scores: onnx.NodeProto, qkv: str, shape: tuple[int, ...], bias: bool
) -> onnx.NodeProto:
    """The nodes from the scores to the output projection; the last one."""
    n, groups, length, heads, head_features = shape
    channels = heads * head_features
    walk.shape(scores, (n, groups, heads, length, length))
    node = walk.consumer(scores, {"Add"})
    walk.constant(node, walk.with_constant(node)[1], (1, heads, length, length))
    softmax = walk.consumer(node, {"Softmax"})
    if walk.attribute(softmax, "axis", -1) % 5 != 4:
        walk.refuse(softmax, "expected a softmax over the last axis")
    context = walk.consumer(softmax, {"Einsum"})
    _einsum(walk, context, _CONTEXT)
    value_slice, _ = _head(walk, context, context.input[1])
    _chunk(walk, value_slice, qkv, 2, channels)
    node = walk.consumer(context, {"Transpose"})
    walk.perm(node, _HEADS_FIRST)
    node = walk.consumer(node, {"Reshape"})
    walk.shape(node, (n, groups, length, channels))
    node = walk.consumer(node, {"MatMul"})
    walk.constant(node, node.input[1], (channels, channels))
    if bias:
        node = walk.consumer(node, {"Add"})
        walk.constant(node, walk.with_constant(node)[1], (channels,))
    walk.shape(node, (n, groups, length, channels))
    return node


def _partition_view(state: Conversion, node: onnx.NodeProto, source: str, partition: Partition) -> None:
    """The output of `node` is the (N, C, H, W) map `source`, partitioned."""
    if source not in state.alias or state.is_permuted(source) or state.shapes.get(source) != partition.shape:
        raise UnsupportedOperator(
            "WindowPartition", node_scope(node), f"its input {source!r} must be an (N, C, H, W) map"
        )
    out = node.output[0]
    state.alias[out] = state.alias[source]
    state.channels_last.add(out)
    state.partitions[out] = partition


def _departition_view(state: Conversion, node: onnx.NodeProto, source: str, partition: Partition) -> None:
    """The output of `node` is the map the partition `source` views, in (N, C, H, W) again."""
    found = state.partitions.get(source)
    if found is None or (found.size, found.swapped, found.shape[2:]) != (
        partition.size,
        partition.swapped,
        partition.shape[2:],
    ):
        raise UnsupportedOperator(
            "WindowDepartition", node_scope(node), f"it must undo the partition {source!r} it reads"
        )
    state.alias[node.output[0]] = state.alias[source]


def _add_attention_layer(
    state: Conversion, node: onnx.NodeProto, source: str, length: int, fields: dict[str, Any]
) -> None:
    """The `attention` layer of a matched MaxViT attention over the partition `source`."""
    partition = state.partitions.get(source)
    if source not in state.alias or partition is None:
        raise UnsupportedOperator(
            "attention", node_scope(node), f"its input {source!r} must be a MaxViT partition of a map"
        )
    _, _, height, width = partition.shape
    size = partition.size
    kernel, dilation = (
        ((height // size, width // size), (size, size)) if partition.swapped else ((size, size), (1, 1))
    )
    if kernel[0] * kernel[1] != length:
        raise UnsupportedOperator(
            "attention", node_scope(node), f"its {length} positions are not those of a window of {kernel}"
        )
    shape = state.ir_layer_shape(source, node)
    out = node.output[0]
    layer_fields = {**fields, "kernel": kernel, "dilation": dilation}
    state.alias[out] = state.add_layer(
        node_scope(node), Op.ATTENTION, [state.alias[source]], shape, shape, layer_fields
    )
    state.keep_layout(out, source)
