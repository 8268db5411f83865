"""Subgraphs read as one layer or one view each (Swin's windowed attention and patch merging, MaxViT's
attention and partitions), and the walk that checks such a subgraph node by node.

A `SubgraphWalk` starts at one node and follows the dataflow backwards (`producer`) and forwards
(`consumer`) through the nodes the pattern expects, checking each one's operator, attributes,
constants and output shape; Identity and Dropout nodes on the way join the subgraph. Once the whole
pattern is followed, `close` checks that the subgraph reads nothing from outside it but its source
and constants, and that no value inside it is used outside it but the output of its last node. Any
difference is a `Mismatch` naming the node.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import onnx
from onnx import TensorProto

from lpnet.arch.onnx_io.conversion import Conversion
from lpnet.arch.onnx_io.limits import MAX_RANK
from lpnet.arch.onnx_io.nodes import Attributes, constant_number, constant_values, node_name
from lpnet.errors import UnsupportedOperator

PASS_THROUGH = frozenset({"Identity", "Dropout"})
# What the last node of a subgraph does: adds its layer, or views its source in another layout.
SubgraphConversion = Callable[[Conversion, onnx.NodeProto], None]


class Mismatch(Exception):
    """A node that does not continue the pattern of the subgraph around it."""


@dataclass(frozen=True)
class Subgraph:
    """A matched subgraph: its nodes (indices in the graph), its last node and what that node does."""

    nodes: frozenset[int]
    end: int
    convert: SubgraphConversion


# Follows the subgraph around one node of a graph (by its index), or raises a Mismatch.
SubgraphMatcher = Callable[[Conversion, "GraphIndex", int], Subgraph]


@dataclass
class Subgraphs:
    """The subgraphs of a graph: their nodes, and the conversion each makes at its last node."""

    inner: set[int] = field(default_factory=set)
    ends: dict[int, SubgraphConversion] = field(default_factory=dict)

    def claims(self, index: int) -> bool:
        return index in self.inner or index in self.ends

    def add(self, subgraph: Subgraph, graph: onnx.GraphProto) -> None:
        shared = sorted(index for index in subgraph.nodes if self.claims(index))
        if shared:
            raise Mismatch(f"node {node_name(graph.node[shared[0]])!r} is also part of another subgraph")
        self.inner.update(index for index in subgraph.nodes if index != subgraph.end)
        self.ends[subgraph.end] = subgraph.convert


class GraphIndex:
    """The node computing each value of a graph and the nodes reading it."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(graph.node):
            self.producer.update((out, index) for out in node.output if out)
            for value in dict.fromkeys(filter(None, node.input)):
                self.readers[value].append(index)
        self.outputs = {value.name for value in graph.output}


class SubgraphWalk:
    """The nodes of one subgraph, followed from one node of it through the pattern of `what` it is."""

    def __init__(self, state: Conversion, index: GraphIndex, start: int, what: str) -> None:
        self.state = state
        self.index = index
        self.what = what
        self.start = index.graph.node[start]
        self.nodes: set[int] = {start}

    def refuse(self, node: onnx.NodeProto, problem: str) -> NoReturn:
        raise Mismatch(f"the {self.what} around it does not match at node {node_name(node)!r}: {problem}")

    def producer(self, node: onnx.NodeProto, value: str, op_types: Collection[str]) -> onnx.NodeProto:
        """The node, of one of `op_types`, computing `value` (an input of `node`); it joins the subgraph."""
        found = self._producer(value)
        while found is not None and found.op_type in PASS_THROUGH:
            node, value = found, found.input[0]
            found = self._producer(value)
        if found is None or found.op_type not in op_types:
            kind = "a constant or the graph's input" if found is None else f"computed by a {found.op_type}"
            self.refuse(node, f"its input {value!r} is {kind}, expected a {' or '.join(sorted(op_types))}")
        return found

    def consumer(self, node: onnx.NodeProto, op_types: Collection[str]) -> onnx.NodeProto:
        """The one node, of one of `op_types`, reading the output of `node`; it joins the subgraph."""
        while True:
            value = node.output[0]
            readers = self.index.readers.get(value, [])
            if len(readers) != 1 or value in self.index.outputs:
                self.refuse(node, f"its output {value!r} must be read once, by the next node of the pattern")
            self.nodes.add(readers[0])
            found = self.index.graph.node[readers[0]]
            if found.op_type not in PASS_THROUGH:
                break
            node = found
        if found.op_type not in op_types:
            self.refuse(found, f"expected a {' or '.join(sorted(op_types))} of {value!r}")
        return found

    def with_constant(self, node: onnx.NodeProto) -> tuple[str, str]:
        """The computed input and the constant input of a node of two inputs."""
        computed = [value for value in node.input if value not in self.state.constants]
        if len(node.input) != 2 or len(computed) != 1:
            self.refuse(node, "expected a computed tensor and a constant")
        (constant,) = (value for value in node.input if value != computed[0])
        return computed[0], constant

    def constant(self, node: onnx.NodeProto, value: str, dims: tuple[int, ...] | None = None) -> TensorProto:
        """The constant `value` (an input of `node`), of the dimensions `dims` when they are given."""
        if value not in self.state.constants:
            self.refuse(node, f"its input {value!r} must be a constant")
        tensor = self.state.constants[value]
        if dims is not None and tuple(tensor.dims) != dims:
            self.refuse(node, f"its constant {value!r} has shape {tuple(tensor.dims)}, expected {dims}")
        return tensor

    def number(self, node: onnx.NodeProto, value: str) -> float:
        """The one number the constant `value` (an input of `node`) holds."""
        tensor = self.constant(node, value)
        try:
            return constant_number(tensor, Attributes(node, node_name(node)))
        except UnsupportedOperator as exc:
            self.refuse(node, exc.message)

    def shape(self, node: onnx.NodeProto, expected: tuple[int, ...]) -> None:
        """The output of `node` has the shape `expected`."""
        shape = self.state.shapes.get(node.output[0])
        if shape != expected:
            self.refuse(node, f"its output {node.output[0]!r} has shape {shape}, expected {expected}")

    def out_shape(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """The static shape of the output of `node`."""
        shape = self.state.shapes.get(node.output[0])
        if shape is None:
            self.refuse(node, f"its output {node.output[0]!r} has no static shape")
        return shape

    def perm(self, node: onnx.NodeProto, expected: tuple[int, ...]) -> None:
        attrs = Attributes(node, node_name(node))
        if "perm" not in attrs or attrs.get_axes("perm") != expected:
            self.refuse(node, f"expected a Transpose with perm {list(expected)}")

    def attribute(self, node: onnx.NodeProto, name: str, default: int) -> int:
        return Attributes(node, node_name(node)).get_int(name, default)

    def axes(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """The axes a reduction runs over: an attribute before opset 18, a constant input from 18."""
        if len(node.input) > 1 and node.input[1]:
            tensor = self.constant(node, node.input[1])
            values = constant_values(tensor, Attributes(node, node_name(node)))
            if values.size > MAX_RANK:
                self.refuse(node, f"its axes {node.input[1]!r} list more than {MAX_RANK} axes")
            return tuple(int(axis) for axis in values.ravel())
        attrs = Attributes(node, node_name(node))
        return attrs.get_axes("axes") if "axes" in attrs else ()

    def slice_of(self, node: onnx.NodeProto) -> tuple[int, int, int, int]:
        """The (axis, start, end, step) of a Slice along one axis, start and end within that axis."""
        attrs = Attributes(node, node_name(node))
        try:
            arguments = self.state.slice_arguments(node, attrs)
        except UnsupportedOperator as exc:
            self.refuse(node, exc.message)
        shape = self.state.shapes.get(node.input[0])
        if shape is None or len(arguments.axes) != 1 or not -len(shape) <= arguments.axes[0] < len(shape):
            self.refuse(node, "expected a slice along one axis of a tensor of static shape")
        axis = arguments.axes[0] % len(shape)
        size = shape[axis]
        start, end = (
            min(max(v + size if v < 0 else v, 0), size) for v in (arguments.starts[0], arguments.ends[0])
        )
        return axis, start, end, arguments.steps[0]

    def roll(self, concat: onnx.NodeProto, axis: int, size: int) -> tuple[int, str]:
        """The amount a of a roll along `axis` (of `size`) and the tensor x it rolls: Concat(x[a:], x[:a]),
        x itself first for a roll by 0."""
        if self.attribute(concat, "axis", 0) % 4 != axis or len(concat.input) != 2:
            self.refuse(concat, f"expected a roll along axis {axis}: the Concat of two slices along it")
        second = self.producer(concat, concat.input[1], {"Slice"})
        rolled, (second_axis, start, amount, step) = second.input[0], self.slice_of(second)
        first_span: tuple[int, ...] = (axis, 0, size, 1)
        if concat.input[0] != rolled:
            first = self.producer(concat, concat.input[0], {"Slice"})
            first_span = self.slice_of(first) if first.input[0] == rolled else ()
        if (second_axis, start, step) != (axis, 0, 1) or first_span != (axis, amount, size, 1):
            self.refuse(concat, f"expected a roll along axis {axis}: x[a:], then x[:a], of one tensor x")
        return amount, rolled

    def map_roll(
        self, concat: onnx.NodeProto, padded: tuple[int, int]
    ) -> tuple[tuple[int, int], onnx.NodeProto, str]:
        """The roll of an (N, pH, pW, C) map by (-sh, -sw), along H and then along W, whose last Concat
        is `concat`: the shift (sh, sw), the Concat along H and the map it rolls."""
        shift_w, rolled = self.roll(concat, 2, padded[1])
        first = self.producer(concat, rolled, {"Concat"})
        shift_h, rolled = self.roll(first, 1, padded[0])
        return (shift_h, shift_w), first, rolled

    def map_rolled_back(
        self, node: onnx.NodeProto, padded: tuple[int, int], shift: tuple[int, int]
    ) -> onnx.NodeProto:
        """The last Concat of the roll back by `shift` of the (N, pH, pW, C) output of `node`."""
        for axis, size, amount_back in ((1, padded[0], shift[0]), (2, padded[1], shift[1])):
            concat = self.roll_of(node)
            amount, rolled = self.roll(concat, axis, size)
            if rolled != node.output[0] or amount != (size - amount_back) % size:
                self.refuse(concat, f"expected the roll back by the shift {shift}")
            node = concat
        return node

    def roll_of(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """The Concat of the roll of the output of `node`, read by it and a Slice or by two Slices."""
        value = node.output[0]
        readers = self.index.readers.get(value, [])
        kinds = sorted(self.index.graph.node[reader].op_type for reader in readers)
        if kinds not in (["Concat", "Slice"], ["Slice", "Slice"]) or value in self.index.outputs:
            self.refuse(node, f"expected its output {value!r} rolled back: read by the slices of a roll")
        first = self.index.graph.node[readers[0]]
        if kinds == ["Slice", "Slice"]:
            self.nodes.add(readers[0])
            return self.consumer(first, {"Concat"})
        (concat,) = (reader for reader in readers if self.index.graph.node[reader].op_type == "Concat")
        self.nodes.add(concat)
        return self.index.graph.node[concat]

    def zero_end_padding(
        self, pad: onnx.NodeProto, multiple: tuple[int, int], channels_first: bool = False
    ) -> tuple[int, ...]:
        """The shape of the map `pad` pads with zeros at the end of H and W, to multiples of `multiple`:
        (N, H, W, C), or (N, C, H, W) when `channels_first`."""
        shape = self.state.shapes.get(pad.input[0], ())
        layout = "(N, C, H, W)" if channels_first else "channels-last (N, H, W, C)"
        if len(shape) != 4:
            self.refuse(pad, f"expected a Pad of a {layout} map, got {shape}")
        rows, columns = (2, 3) if channels_first else (1, 2)
        attrs = Attributes(pad, node_name(pad))
        pads, zero = self._pads(pad, attrs)
        extents = (shape[rows], shape[columns])
        ends = [(size - extent % size) % size for extent, size in zip(extents, multiple, strict=True)]
        expected = np.zeros(8, dtype=np.int64)
        expected[[4 + rows, 4 + columns]] = ends
        constant = attrs.get_string("mode", "constant") == "constant"
        if (
            pads.shape != expected.shape
            or (pads != expected).any()
            or not zero
            or not constant
            or len(pad.input) > 3
        ):
            self.refuse(pad, f"expected a zero Pad of the end of H and W by {ends}: pads {expected.tolist()}")
        padded = list(shape)
        padded[rows] += ends[0]
        padded[columns] += ends[1]
        self.shape(pad, tuple(padded))
        return shape

    def _pads(self, pad: onnx.NodeProto, attrs: Attributes) -> tuple[np.ndarray, bool]:
        """The pads of a Pad (an attribute before opset 11, a constant input from 11), and whether it
        pads with zeros."""
        if "pads" in attrs:
            pads = attrs.by_name["pads"].ints
            if len(pads) > 2 * MAX_RANK:
                self.refuse(pad, f"its pads list more than {2 * MAX_RANK} values")
            return np.array(list(pads)), attrs.get_float("value", 0.0) == 0
        pads_value = constant_values(self.constant(pad, pad.input[1] if len(pad.input) > 1 else ""), attrs)
        value = pad.input[2] if len(pad.input) > 2 else ""
        return pads_value.ravel(), not value or self.number(pad, value) == 0

    def close(self, source: str, end: onnx.NodeProto, convert: SubgraphConversion) -> Subgraph:
        """The subgraph ending at `end`, once checked that it reads nothing from outside it but `source`
        and constants and that no value inside it is used outside it but the output of `end`."""
        graph = self.index.graph
        inside = {out for index in self.nodes for out in graph.node[index].output if out}
        end_index = self.index.producer[end.output[0]]
        for index in sorted(self.nodes):
            node = graph.node[index]
            for value in filter(None, node.input):
                if value not in inside and value != source and value not in self.state.constants:
                    self.refuse(node, f"its input {value!r} comes from outside it")
            for out in filter(None, node.output[1:] if index == end_index else node.output):
                if any(reader not in self.nodes for reader in self.index.readers.get(out, [])):
                    self.refuse(node, f"its output {out!r} is used outside it")
                if out in self.index.outputs:
                    self.refuse(node, f"its output {out!r} is an output of the graph")
        return Subgraph(frozenset(self.nodes), end_index, convert)

    def _producer(self, value: str) -> onnx.NodeProto | None:
        """The node computing `value`, which joins the subgraph; None for a constant or the graph's input."""
        index = self.index.producer.get(value)
        if index is None:
            return None
        self.nodes.add(index)
        return self.index.graph.node[index]
