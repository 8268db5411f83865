"""The state of one graph's conversion into IR layers, shared by the converters of each operator family.

Each ONNX value the converter has met is one of: an IR tensor (`alias`, its layer's name), possibly
in another layout (`channels_last`, which includes (N, L, C) token sequences and MaxViT's
`partitions`, and `channels_swapped`); a 5-D view of a channel shuffle (`grouped`); or a value
partway through a decomposed GELU (`gelu`). Constants are kept apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto
from pydantic import ValidationError

from lpnet.arch.from_torch.state import Partition
from lpnet.arch.ir import Layer, Op, architecture_error
from lpnet.arch.onnx_io.folding import constant_names, static_dims
from lpnet.arch.onnx_io.limits import MAX_RANK
from lpnet.arch.onnx_io.nodes import Attributes, constant_values, node_name
from lpnet.errors import UnsupportedOperator


@dataclass
class LayerSpec:
    """The one layer a node becomes: its operator, the ONNX values it reads and its other fields."""

    op: Op
    inputs: list[str]
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceArguments:
    """What a Slice node takes of each axis it names: axes[i] from starts[i] to ends[i] by steps[i]."""

    starts: list[int]
    ends: list[int]
    axes: list[int]
    steps: list[int]


class Conversion:
    """What is known of every value of a folded, shape-inferred graph, and the layers made so far."""

    def __init__(self, model: onnx.ModelProto, opset: int) -> None:
        self.graph = model.graph
        self.opset = opset
        # Constant tensors by value name, read into numbers only where an operator needs their values.
        self.constants: dict[str, TensorProto] = {init.name: init for init in self.graph.initializer}
        self.initializers = constant_names(self.graph)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for value in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            dims = static_dims(value.type)
            if dims is not None:
                self.shapes[value.name] = dims
        self.alias: dict[str, str] = {}
        # Values that view an IR tensor without being (N, C, H, W): the channels-last permutation of
        # their alias, and the (N, groups, C / groups, H, W) views of a channel shuffle.
        self.channels_last: set[str] = set()
        self.channels_swapped: set[str] = set()  # (N, W, H, C) views, for a softmax over the last axis
        self.grouped: dict[str, tuple[str, int, bool]] = {}  # value -> (IR tensor, groups, transposed)
        # Channels-last values that are MaxViT partitions of their IR tensor, (N, groups, positions, C).
        self.partitions: dict[str, Partition] = {}
        # Values partway through a decomposed GELU: value -> (the GELU's input, steps done).
        self.gelu: dict[str, tuple[str, int]] = {}
        # Outputs of MatMul layers, by layer name, that the Add of a bias may complete.
        self.biasable: dict[str, str] = {}
        self.consumers = Counter(v for n in self.graph.node for v in n.input if v)
        self.consumers.update(v.name for v in self.graph.output)
        self.layers: list[Layer] = []
        self.layer_by_name: dict[str, Layer] = {}
        self.used: set[str] = set()

    def is_tensor(self, value: str) -> bool:
        return value in self.alias or value in self.grouped or value in self.gelu

    def is_permuted(self, value: str) -> bool:
        """Whether `value` holds its IR tensor in another layout than (N, C, H, W)."""
        return value in self.channels_last or value in self.channels_swapped

    def shape(self, value: str, node: onnx.NodeProto) -> tuple[int, ...]:
        if value not in self.shapes:
            raise UnsupportedOperator(node.op_type, node_name(node), f"no static shape for tensor {value!r}")
        return self.shapes[value]

    def layer_shape(self, value: str, node: onnx.NodeProto) -> tuple[int, ...]:
        """The static shape of a layer's input or output: (N, C, H, W) or (N, F)."""
        shape = self.shape(value, node)
        hw(shape, node_name(node))
        return shape

    def ir_layer_shape(self, value: str, node: onnx.NodeProto) -> tuple[int, ...]:
        """The (N, C, H, W) or (N, F) shape of a value, its channels-last layout put back.

        A channels-last (N, L, C) token sequence is the (N, C, 1, L) map, and a MaxViT partition the
        map it partitions, with its own channels.
        """
        shape = self.shape(value, node)
        if value in self.partitions:
            n, _, h, w = self.partitions[value].shape
            return n, shape[-1], h, w
        if value in self.channels_last and len(shape) == 3:
            return shape[0], shape[2], 1, shape[1]
        if value in self.channels_last:
            return shape[0], shape[3], shape[1], shape[2]
        return self.layer_shape(value, node)

    def view(self, value: str, source: str) -> None:
        """`value` holds what `source` holds, in the same layout."""
        if source in self.grouped:
            self.grouped[value] = self.grouped[source]
            return
        self.alias[value] = self.alias[source]
        self.keep_layout(value, source)

    def keep_layout(self, value: str, source: str) -> None:
        """`value` holds its IR tensor in the layout `source` holds its own."""
        if source in self.channels_last:
            self.channels_last.add(value)
        if source in self.channels_swapped:
            self.channels_swapped.add(value)
        if source in self.partitions:
            self.partitions[value] = self.partitions[source]

    def add_layer(
        self,
        base_name: str,
        op: Op,
        inputs: list[str],
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        fields: dict[str, Any],
    ) -> str:
        """Append a layer named after `base_name` (made unique) taking the IR values `inputs`; its name."""
        layer_name = base_name
        k = 1
        while layer_name in self.used:
            layer_name = f"{base_name}:{k}"
            k += 1
        self.used.add(layer_name)
        in_channels = fields.pop("in_channels", in_shape[1])
        try:
            layer = Layer(
                name=layer_name,
                op=op,
                inputs=inputs,
                in_channels=in_channels,
                out_channels=out_shape[1],
                in_hw=hw(in_shape, base_name),
                out_hw=hw(out_shape, base_name),
                **fields,
            )
        except ValidationError as exc:
            raise architecture_error(exc) from exc
        self.layers.append(layer)
        self.layer_by_name[layer_name] = layer
        return layer_name

    def add_same_shape_layer(self, node: onnx.NodeProto, op: Op, source: str) -> None:
        """The output of `node` is a layer `op` of `source` keeping its shape and its layout."""
        shape = self.ir_layer_shape(source, node)
        out = node.output[0]
        self.alias[out] = self.add_layer(node_name(node), op, [self.alias[source]], shape, shape, {})
        self.keep_layout(out, source)

    def constant_input(self, node: onnx.NodeProto, attrs: Attributes, index: int, what: str) -> np.ndarray:
        """The values of the constant `index`-th input of a node (its `what`), at most MAX_RANK * 2 of them."""
        value = node.input[index] if len(node.input) > index else ""
        if value not in self.constants:
            raise UnsupportedOperator(node.op_type, attrs.where, f"the {what} must be a constant")
        values = constant_values(self.constants[value], attrs)
        if values.size > 2 * MAX_RANK:
            raise UnsupportedOperator(node.op_type, attrs.where, f"the {what} {value!r} has too many values")
        return values

    def slice_arguments(self, node: onnx.NodeProto, attrs: Attributes) -> SliceArguments:
        """The constant starts, ends, axes and steps of a Slice (attributes before opset 10, inputs from 10)."""
        if "starts" in attrs:
            starts = list(attrs.get_axes("starts"))
            ends = list(attrs.get_axes("ends")) if "ends" in attrs else []
            axes = list(attrs.get_axes("axes")) if "axes" in attrs else list(range(len(starts)))
            steps = [1] * len(starts)
        else:
            starts = [int(v) for v in self.constant_input(node, attrs, 1, "starts").ravel()]
            ends = [int(v) for v in self.constant_input(node, attrs, 2, "ends").ravel()]
            has_axes = len(node.input) > 3 and bool(node.input[3])
            has_steps = len(node.input) > 4 and bool(node.input[4])
            axes_values = (
                self.constant_input(node, attrs, 3, "axes").ravel() if has_axes else range(len(starts))
            )
            steps_values = (
                self.constant_input(node, attrs, 4, "steps").ravel() if has_steps else [1] * len(starts)
            )
            axes, steps = [int(v) for v in axes_values], [int(v) for v in steps_values]
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise UnsupportedOperator(
                "Slice", attrs.where, "its starts, ends, axes and steps must have one value per axis"
            )
        return SliceArguments(starts, ends, axes, steps)


# A converter of the nodes of one operator that each become one layer.
LayerRule = Callable[[Conversion, onnx.NodeProto, Attributes, list[str]], LayerSpec]
# A converter of nodes that re-view their input or make several layers; False when it does not apply.
NodeRule = Callable[[Conversion, onnx.NodeProto, Attributes, str], bool]


def hw(shape: tuple[int, ...], where: str) -> tuple[int, int]:
    if len(shape) == 4:
        return shape[2], shape[3]
    if len(shape) == 2:
        return 1, 1
    raise UnsupportedOperator(
        "tensor rank", where, f"only (N, C, H, W) and (N, F) tensors are supported, got {shape}"
    )
