"""Architecture IR: a network is a DAG of layers with static shapes.

The IR is the one currency between the profiler, the predictors, the planner and the service. It is a
pydantic model, so the JSON document a client sends is validated into the same object that the
tracer and the ONNX reader build.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lpnet.errors import InvalidArchitecture

IR_VERSION = 1
NETWORK_INPUT = "input"


class Op(StrEnum):
    """Operators the IR knows. Anything else is rejected by name when a network is built."""

    CONV2D = "conv2d"
    LINEAR = "linear"
    BATCHNORM2D = "batchnorm2d"
    RELU = "relu"
    RELU6 = "relu6"
    SILU = "silu"
    GELU = "gelu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    HARDSWISH = "hardswish"
    HARDSIGMOID = "hardsigmoid"
    MAXPOOL2D = "maxpool2d"
    AVGPOOL2D = "avgpool2d"
    ADAPTIVE_AVGPOOL2D = "adaptive_avgpool2d"
    ADD = "add"
    MUL = "mul"
    CONCAT = "concat"
    FLATTEN = "flatten"


ACTIVATIONS = frozenset(
    {Op.RELU, Op.RELU6, Op.SILU, Op.GELU, Op.SIGMOID, Op.TANH, Op.HARDSWISH, Op.HARDSIGMOID}
)
ELEMENTWISE_BINARY = frozenset({Op.ADD, Op.MUL})
# Ops whose output channel count is a free parameter of the layer (what pruning changes).
PARAMETRIC_OUT = frozenset({Op.CONV2D, Op.LINEAR})

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Pair = tuple[PositiveInt, PositiveInt]


class Layer(BaseModel):
    """One operator with static shapes.

    Tensors are (N, C, H, W); after `flatten` they are (N, C*H*W) and carry `hw == (1, 1)`.
    `in_channels` of a multi-input op is the channel count of each input (add, mul) or their sum
    (concat).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    op: Op
    inputs: list[str] = Field(min_length=1)
    in_channels: PositiveInt
    out_channels: PositiveInt
    in_hw: Pair
    out_hw: Pair
    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: tuple[NonNegativeInt, NonNegativeInt] = (0, 0)
    dilation: Pair = (1, 1)
    groups: PositiveInt = 1
    bias: bool = False
    ceil_mode: bool = False

    @model_validator(mode="after")
    def _check_op_fields(self) -> Layer:
        where = f"layer {self.name!r} ({self.op.value})"
        if self.op is Op.CONV2D:
            if self.in_channels % self.groups or self.out_channels % self.groups:
                raise ValueError(
                    f"{where}: groups={self.groups} must divide in_channels={self.in_channels} "
                    f"and out_channels={self.out_channels}"
                )
        elif self.groups != 1:
            raise ValueError(f"{where}: groups is only meaningful for conv2d")
        if self.op not in PARAMETRIC_OUT and self.op not in (Op.CONCAT, Op.FLATTEN):
            if self.in_channels != self.out_channels:
                raise ValueError(
                    f"{where}: in_channels={self.in_channels} must equal out_channels={self.out_channels}"
                )
        if self.op is Op.FLATTEN and self.out_channels != self.in_channels * self.in_hw[0] * self.in_hw[1]:
            raise ValueError(f"{where}: out_channels must be in_channels*H*W")
        if self.op in (Op.CONV2D, Op.MAXPOOL2D, Op.AVGPOOL2D):
            expected = conv_output_hw(
                self.in_hw, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode
            )
            if expected != self.out_hw:
                raise ValueError(
                    f"{where}: out_hw={self.out_hw} but the kernel, stride and padding "
                    f"give {expected} from in_hw={self.in_hw}"
                )
        if self.op not in (Op.ADD, Op.MUL, Op.CONCAT) and len(self.inputs) != 1:
            raise ValueError(f"{where}: takes exactly one input, got {len(self.inputs)}")
        if self.op in (Op.ADD, Op.MUL, Op.CONCAT) and len(self.inputs) < 2:
            raise ValueError(f"{where}: needs at least two inputs")
        return self

    @property
    def is_depthwise(self) -> bool:
        return self.op is Op.CONV2D and self.groups == self.in_channels and self.groups > 1


def conv_output_hw(
    in_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    ceil_mode: bool = False,
) -> tuple[int, int]:
    """Spatial output size of a convolution or pooling window (PyTorch's formula)."""
    out = []
    for i in range(2):
        span = in_hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1
        if ceil_mode:
            size = -(-span // stride[i]) + 1
            # PyTorch drops the last window when it would start inside the right padding.
            if (size - 1) * stride[i] >= in_hw[i] + padding[i]:
                size -= 1
        else:
            size = span // stride[i] + 1
        out.append(size)
    return out[0], out[1]


class Network(BaseModel):
    """A network: its input shape, its layers in topological order and its outputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ir_version: int = IR_VERSION
    name: str | None = Field(default=None, max_length=200)
    family: str | None = Field(default=None, max_length=100)
    input_shape: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt]
    layers: list[Layer] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_graph(self) -> Network:
        if self.ir_version != IR_VERSION:
            raise ValueError(f"ir_version {self.ir_version} is not supported; this build reads {IR_VERSION}")
        produced: dict[str, tuple[int, tuple[int, int]]] = {
            NETWORK_INPUT: (self.input_shape[1], (self.input_shape[2], self.input_shape[3]))
        }
        names = {layer.name for layer in self.layers}
        if len(names) != len(self.layers):
            dup = sorted({n for n in names if sum(lay.name == n for lay in self.layers) > 1})
            raise ValueError(f"layer names must be unique; repeated: {dup}")
        if NETWORK_INPUT in names:
            raise ValueError(f"{NETWORK_INPUT!r} is reserved for the network input")
        for index, layer in enumerate(self.layers):
            for ref in layer.inputs:
                if ref not in produced:
                    if ref in names:
                        raise ValueError(
                            f"layers[{index}] {layer.name!r} takes input {ref!r}, which comes later: "
                            "layers must be listed in topological order and the graph must be acyclic"
                        )
                    raise ValueError(
                        f"layers[{index}] {layer.name!r} takes input {ref!r}, which no layer produces"
                    )
            _check_input_shapes(index, layer, [produced[ref] for ref in layer.inputs])
            produced[layer.name] = (layer.out_channels, layer.out_hw)
        for out in self.outputs:
            if out not in names:
                raise ValueError(f"output {out!r} is not a layer of this network")
        return self

    # ---- lookups -------------------------------------------------------------------------------

    @cached_property
    def by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}

    @cached_property
    def consumers(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {layer.name: [] for layer in self.layers}
        for layer in self.layers:
            for ref in layer.inputs:
                if ref != NETWORK_INPUT:
                    users[ref].append(layer.name)
        return users

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.op.value] = counts.get(layer.op.value, 0) + 1
        return counts

    # ---- serialisation and identity ------------------------------------------------------------

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Network:
        """Parse and validate a JSON document; raises InvalidArchitecture naming the bad field."""
        from pydantic import ValidationError

        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise InvalidArchitecture.from_validation_error(exc) from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        from pydantic import ValidationError

        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidArchitecture.from_validation_error(exc) from exc

    @cached_property
    def content_hash(self) -> str:
        """A hash of the computation alone: independent of layer names, list order and metadata.

        Each layer hashes its own attributes and the hashes of its inputs (a Merkle DAG), so two
        graphs that compute the same thing hash equal however their layers were named or listed.
        """
        digests: dict[str, str] = {NETWORK_INPUT: _sha(json.dumps(["input", list(self.input_shape)]))}
        for layer in self.layers:
            input_digests = [digests[ref] for ref in layer.inputs]
            if layer.op in ELEMENTWISE_BINARY:
                input_digests.sort()  # add and mul commute
            attrs = layer.model_dump(mode="json", exclude={"name", "inputs"})
            digests[layer.name] = _sha(json.dumps([attrs, input_digests], sort_keys=True))
        return _sha(json.dumps([digests[o] for o in self.outputs]))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_input_shapes(index: int, layer: Layer, shapes: list[tuple[int, tuple[int, int]]]) -> None:
    where = f"layers[{index}] {layer.name!r} ({layer.op.value})"
    hws = {hw for _, hw in shapes}
    if layer.op is Op.CONCAT:
        total = sum(c for c, _ in shapes)
        if total != layer.in_channels:
            raise ValueError(
                f"{where}: inputs bring {total} channels in total but in_channels={layer.in_channels}"
            )
        if len(hws) != 1 or layer.in_hw not in hws:
            raise ValueError(f"{where}: inputs have spatial sizes {sorted(hws)}, expected all {layer.in_hw}")
        return
    if layer.op in ELEMENTWISE_BINARY:
        channels = {c for c, _ in shapes}
        # mul broadcasts a (C, 1, 1) scale over (C, H, W), as squeeze-and-excitation does.
        if channels != {layer.in_channels}:
            raise ValueError(
                f"{where}: inputs have channels {sorted(channels)}, expected all {layer.in_channels}"
            )
        if layer.op is Op.ADD and hws != {layer.in_hw}:
            raise ValueError(f"{where}: inputs have spatial sizes {sorted(hws)}, expected all {layer.in_hw}")
        return
    channels_in, hw_in = shapes[0]
    if channels_in != layer.in_channels:
        raise ValueError(
            f"{where}: its input {layer.inputs[0]!r} produces {channels_in} channels but in_channels={layer.in_channels}"
        )
    if hw_in != layer.in_hw:
        raise ValueError(
            f"{where}: its input {layer.inputs[0]!r} produces spatial size {hw_in} but in_hw={layer.in_hw}"
        )
