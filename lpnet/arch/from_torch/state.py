"""The state of one graph's conversion: the IR layers built so far and what each fx node stands for.

Besides tensors in (N, C, H, W), a node can stand for what a CNN computes between layers without
being a layer: a number (a shape read with `x.size()` and arithmetic on it), the 5-D view of a
channel shuffle, the parts of a chunk along channels, a channels-last tensor ((N, H, W, C), or a
token sequence (N, L, C), the IR's (N, C, 1, L)), a MaxViT partition of a map, or a parameter (or a
tensor computed from parameters alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from pydantic import ValidationError

from lpnet.arch.from_torch.nodes import hw, tensor_shape
from lpnet.arch.ir import Layer, Op
from lpnet.errors import InvalidArchitecture, UnsupportedOperator

# The op of the layer a node computes and the Layer fields it sets; "inputs" holds the fx nodes read.
LayerCall = tuple[Op, dict[str, Any]]


@dataclass(frozen=True)
class GroupedChannels:
    """A tensor viewed as (N, groups, C / groups, H, W), the first step of a channel shuffle.

    `transposed`: the two channel axes have been swapped; reshaped back to 4-D it is the shuffle.
    """

    source: str  # IR tensor it is a view of
    groups: int
    transposed: bool


@dataclass(frozen=True)
class Partition:
    """An (N, C, H, W) map partitioned as MaxViT does, (N, groups, positions, C), channels-last.

    `size`: the partition's p (blocks of p x p positions). Attention runs over the positions axis:
    those of one block, or after a swap of the two middle axes (`swapped`), the positions at one
    offset in every block (MaxViT's grid attention, a window dilated by p).
    """

    shape: tuple[int, int, int, int]  # the map's (N, C, H, W)
    size: int
    swapped: bool


@dataclass(frozen=True)
class Parts:
    """The parts of a chunk or split along channels: (offset, channels) of each, and the source tensor."""

    source: fx.Node
    spans: tuple[tuple[int, int], ...]


class GraphState:
    """The IR layers converted so far, and what each fx node already converted stands for."""

    def __init__(self) -> None:
        self.alias: dict[str, str] = {}  # fx node name -> IR tensor name
        self.channels_last: set[str] = set()  # fx nodes holding their IR tensor permuted to NHWC
        self.grouped: dict[str, GroupedChannels] = {}
        self.parts: dict[str, Parts] = {}
        self.scalars: set[str] = set()  # fx nodes computing numbers (shapes), not tensors
        self.parameters: dict[str, tuple[int, ...]] = {}  # get_attr nodes: the shape of the tensor read
        self.layers: list[Layer] = []
        self.used_names: set[str] = set()
        self.attention_outputs: set[str] = set()  # nn.MultiheadAttention calls: (output, weights)
        self.partitions: dict[str, Partition] = {}  # MaxViT's partitioned views of maps

    def ref(self, arg: Any) -> str:
        """The IR tensor `arg` is, for a layer to read; naming what it is instead when no layer can."""
        if not isinstance(arg, fx.Node):
            raise UnsupportedOperator("constant", str(arg), "only tensors produced by layers can be inputs")
        if arg.name in self.alias and arg.name not in self.channels_last:
            return self.alias[arg.name]
        if arg.name in self.parameters:
            raise UnsupportedOperator(
                "get_attr", arg.name, f"the module reads tensor attribute {arg.target!r} in forward"
            )
        if arg.name in self.channels_last:
            raise UnsupportedOperator(
                "channels-last tensor",
                arg.name,
                "a tensor permuted to (N, H, W, C) is only supported through layer norms, linears, "
                "activations and adds until it is permuted back",
            )
        if arg.name in self.grouped:
            raise UnsupportedOperator(
                "grouped view", arg.name, "a 5-D view of the channels must be a channel shuffle"
            )
        raise UnsupportedOperator(
            "non-tensor value", arg.name, "only single (N, C, H, W) or (N, F) tensors can be layer inputs"
        )

    def ir_shape(self, node: fx.Node) -> tuple[int, ...]:
        """The (N, C, H, W) or (N, F) shape of a tensor node in IR terms (channels-last permuted back)."""
        shape = tensor_shape(node)
        if node.name in self.partitions:  # the map's shape, with the channels the node holds
            n, _, h, w = self.partitions[node.name].shape
            return n, shape[-1], h, w
        if len(shape) == 3:  # a token sequence: (N, L, C) channels-last, else (N, C, L)
            if node.name in self.channels_last:
                return shape[0], shape[2], 1, shape[1]
            return shape[0], shape[1], 1, shape[2]
        if node.name in self.channels_last:
            n, h, w, c = shape
            return n, c, h, w
        return shape

    def add_layer(
        self,
        base: str,
        op: Op,
        inputs: list[str],
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        **attrs: Any,
    ) -> str:
        """Append a layer named `base` (with a suffix when taken); its name, the IR tensor it outputs."""
        name = self._unique_name(base)
        in_channels = attrs.pop("in_channels", in_shape[1])
        try:
            layer = Layer(
                name=name,
                op=op,
                inputs=inputs,
                in_channels=in_channels,
                out_channels=out_shape[1],
                in_hw=hw(in_shape),
                out_hw=hw(out_shape),
                **attrs,
            )
        except ValidationError as exc:
            raise InvalidArchitecture.from_validation_error(exc) from exc
        self.layers.append(layer)
        return name

    def same_tensor(self, node: fx.Node, source: fx.Node) -> None:
        """`node` is the tensor `source` is (an identity at inference, or a view of the same values)."""
        if source.name in self.alias:
            self.alias[node.name] = self.alias[source.name]
        if source.name in self.grouped:
            self.grouped[node.name] = self.grouped[source.name]
        if source.name in self.parts:
            self.parts[node.name] = self.parts[source.name]
        if source.name in self.channels_last:
            self.channels_last.add(node.name)
        if source.name in self.partitions:
            self.partitions[node.name] = self.partitions[source.name]
        if source.name in self.scalars:
            self.scalars.add(node.name)

    def _unique_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name = f"{base}:{k}"
            k += 1
        self.used_names.add(name)
        return name
