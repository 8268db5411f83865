"""Architecture IR: a network is a DAG of layers with static shapes.

The IR is the one currency between the profiler, the predictors, the planner and the service. It is a
pydantic model, so the JSON document a client sends is validated into the same object that the
tracer and the ONNX reader build.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lpnet.errors import ArchitectureTooLarge, InvalidArchitecture

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
    LRN = "lrn"
    PAD = "pad"
    SOFTMAX = "softmax"
    CHANNEL_SHUFFLE = "channel_shuffle"
    SLICE = "slice"
    UPSAMPLE_NEAREST = "upsample_nearest"
    UPSAMPLE_BILINEAR = "upsample_bilinear"
    LAYERNORM = "layernorm"
    TOKENS = "tokens"
    CLASS_TOKEN = "class_token"
    POSITION_EMBEDDING = "position_embedding"
    ATTENTION = "attention"
    TOKEN_SELECT = "token_select"
    SPACE_TO_DEPTH = "space_to_depth"


ACTIVATIONS = frozenset(
    {Op.RELU, Op.RELU6, Op.SILU, Op.GELU, Op.SIGMOID, Op.TANH, Op.HARDSWISH, Op.HARDSIGMOID}
)
ELEMENTWISE_BINARY = frozenset({Op.ADD, Op.MUL})
# Ops whose output channel count is a free parameter of the layer (what pruning changes).
PARAMETRIC_OUT = frozenset({Op.CONV2D, Op.LINEAR})
UPSAMPLES = frozenset({Op.UPSAMPLE_NEAREST, Op.UPSAMPLE_BILINEAR})
_CHANNEL_CHANGING = PARAMETRIC_OUT | {Op.CONCAT, Op.FLATTEN, Op.SLICE, Op.SPACE_TO_DEPTH}
_WINDOWED = frozenset({Op.CONV2D, Op.MAXPOOL2D, Op.AVGPOOL2D})
_GROUPED = frozenset({Op.CONV2D, Op.CHANNEL_SHUFFLE, Op.ATTENTION})
# Data-movement, normalisation and attention ops whose output keeps the input's spatial size.
_SAME_HW = frozenset(
    {Op.LRN, Op.SOFTMAX, Op.CHANNEL_SHUFFLE, Op.SLICE, Op.LAYERNORM, Op.POSITION_EMBEDDING, Op.ATTENTION}
)
# Ops of transformers: token sequences, attention and patch merging.
TRANSFORMER_OPS = frozenset(
    {Op.TOKENS, Op.CLASS_TOKEN, Op.POSITION_EMBEDDING, Op.ATTENTION, Op.TOKEN_SELECT, Op.SPACE_TO_DEPTH}
)
# Fields the content hash leaves out while they hold their default, so that the hash of a network
# that does not use them does not depend on their existence.
_HASH_OPTIONAL_DEFAULTS: dict[str, Any] = {"channel_offset": 0, "shift": [0, 0], "position_bias": False}
_MULTI_INPUT = frozenset({Op.ADD, Op.MUL, Op.CONCAT})

# Bounds on what one network may describe. The service validates, analyses and runs the networks
# clients send, so every dimension and every total is bounded. Each bound admits every torchvision
# classification model the IR represents at 3x its standard input size, as measured with torchvision
# 0.29 (efficientnet_b7 at 1800 px, regnet_y_128gf at 1152 px).
MAX_LAYERS = 4096  # 4x efficientnet_v2_l's 1,018 IR layers; validating 4,096 takes about 50 ms
MAX_LAYER_INPUTS = 128  # densenet201's widest concatenation takes 49 tensors
MAX_BATCH = 1024  # images in the network's input
MAX_SPATIAL = 8192  # feature map height and width; the largest model input above is 1800 px
# Channels count flattened features (C*H*W) too: VGG's classifier takes 25,088, and a 512x21x21 map
# (a 672 px input without global pooling) flattens to 225,792.
MAX_CHANNELS = 2**18
MAX_WINDOW = MAX_SPATIAL  # kernel, stride, padding, dilation: a pooling window may span a whole map
BYTES_PER_ELEMENT = 4  # tensors are estimated as float32
MAX_TENSOR_BYTES = 4 * 2**30  # one activation; the largest above is 0.62 GB (efficientnet_b7)
# Activations alive at once in a forward pass that frees each tensor after its last consumer (as a
# torch.fx module does); the most above is 1.24 GB (efficientnet_b7).
MAX_ACTIVATION_BYTES = 16 * 2**30
MAX_PARAMS = 2**30  # 4 GiB of float32 weights; the largest torchvision model, regnet_y_128gf, has 645 M
MAX_MACS = 4 * 10**12  # regnet_y_128gf needs 3.37 T at 1152 px; minutes of one CPU's time per pass

Channels = Annotated[int, Field(gt=0, le=MAX_CHANNELS)]
Extent = Annotated[int, Field(gt=0, le=MAX_SPATIAL)]
Window = Annotated[int, Field(gt=0, le=MAX_WINDOW)]
Pair = tuple[Extent, Extent]
WindowPair = tuple[Window, Window]
PaddingPair = tuple[Annotated[int, Field(ge=0, le=MAX_WINDOW)], Annotated[int, Field(ge=0, le=MAX_WINDOW)]]


def _check_input_tensor(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    _check_bound(
        "bytes in its input tensor (float32)",
        math.prod(shape) * BYTES_PER_ELEMENT,
        MAX_TENSOR_BYTES,
        "MAX_TENSOR_BYTES",
    )
    return shape


InputShape = Annotated[
    tuple[Annotated[int, Field(gt=0, le=MAX_BATCH)], Channels, Extent, Extent],  # (N, C, H, W)
    AfterValidator(_check_input_tensor),
]


class Layer(BaseModel):
    """One operator with static shapes.

    Tensors are (N, C, H, W); after `flatten` they are (N, C*H*W) and carry `hw == (1, 1)`.
    `in_channels` of a multi-input op is the channel count of each input (add, mul) or their sum
    (concat).

    Operators whose fields need a word:

    - `lrn`: local response normalisation across channels; `kernel == (size, 1)`, `size` being the
      number of neighbouring channels each channel is normalised over.
    - `pad`: zero padding of H and W, `padding` rows and columns on each side.
    - `softmax` and `layernorm`: over the channels at each position (a layer norm of the channels
      of a channels-last tensor, as ConvNeXt normalises, with a weight and a bias per channel).
    - `channel_shuffle`: the channels seen as a (groups, C / groups) matrix, transposed
      (ShuffleNet's reshape, transpose, reshape); `groups` is that number of groups.
    - `slice`: the channels `channel_offset` to `channel_offset + out_channels` of its input (a split
      or chunk along channels is one slice per part).
    - `upsample_nearest`, `upsample_bilinear`: H and W each multiplied by an integer factor.

    Transformers. A sequence of N tokens of C features, (N_batch, tokens, C) in PyTorch, is the
    (N_batch, C, 1, N) map: channels are the embedding and the tokens lie along W. A channels-last
    map (N, H, W, C), as Swin computes on, is its NCHW original. Linears over the embedding are
    1x1 `conv2d`s and layer norms over it `layernorm`s, as for ConvNeXt.

    - `tokens`: a (C, H, W) map read as the sequence of its H*W positions, (C, 1, H*W) (ViT's patch
      flatten).
    - `class_token`: a learned token put before the sequence: (C, 1, N) to (C, 1, N + 1).
    - `position_embedding`: adds a learned tensor of the input's full (C, H, W) shape.
    - `attention`: multi-head self-attention among the positions of each `kernel`-sized window of
      the map (`kernel == in_hw` for attention over all positions, as ViT's), the window's
      positions `dilation` apart (MaxViT's grid attention: `kernel * dilation` spans the map), with `groups` heads,
      the query/key/value and output projections (with biases when `bias`), windows rolled by
      `shift` positions first (Swin's shifted windows; each below its window's size) and, with
      `position_bias`, a learned bias per head and relative position within the window. A map not a
      multiple of the window is zero-padded to one.
    - `token_select`: the first position, (C, H, W) to (C,) features (ViT's class token output).
    - `space_to_depth`: each 2x2 block of positions stacked into the channels, (C, H, W) to
      (4C, ceil(H/2), ceil(W/2)), an odd H or W zero-padded (Swin's patch merging).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    op: Op
    inputs: list[str] = Field(min_length=1, max_length=MAX_LAYER_INPUTS)
    in_channels: Channels
    out_channels: Channels
    in_hw: Pair
    out_hw: Pair
    kernel: WindowPair = (1, 1)
    stride: WindowPair = (1, 1)
    padding: PaddingPair = (0, 0)
    dilation: WindowPair = (1, 1)
    groups: Channels = 1
    bias: bool = False
    ceil_mode: bool = False
    channel_offset: Annotated[int, Field(ge=0, lt=MAX_CHANNELS)] = 0
    shift: PaddingPair = (0, 0)
    position_bias: bool = False

    @model_validator(mode="after")
    def _check_op_fields(self) -> Layer:
        op = self.op
        if op in _GROUPED:
            if self.in_channels % self.groups or self.out_channels % self.groups:
                raise ValueError(
                    f"{self._where}: groups={self.groups} must divide in_channels={self.in_channels} "
                    f"and out_channels={self.out_channels}"
                )
        elif self.groups != 1:
            raise ValueError(f"{self._where}: groups is only meaningful for conv2d and channel_shuffle")
        if op is Op.SLICE:
            if self.channel_offset + self.out_channels > self.in_channels:
                raise ValueError(
                    f"{self._where}: channels {self.channel_offset} to "
                    f"{self.channel_offset + self.out_channels} are beyond in_channels={self.in_channels}"
                )
        elif self.channel_offset:
            raise ValueError(f"{self._where}: channel_offset is only meaningful for slice")
        if self.dilation != (1, 1) and op not in (Op.CONV2D, Op.MAXPOOL2D, Op.ATTENTION):
            raise ValueError(
                f"{self._where}: dilation is only meaningful for conv2d, maxpool2d and attention"
            )
        if op is Op.ATTENTION:
            if any(s >= k for s, k in zip(self.shift, self.kernel, strict=True)):
                raise ValueError(f"{self._where}: shift={self.shift} must be below the window {self.kernel}")
        elif self.shift != (0, 0) or self.position_bias:
            raise ValueError(f"{self._where}: shift and position_bias are only meaningful for attention")
        self._check_token_rule()
        self._check_spatial_rule()
        if op not in _CHANNEL_CHANGING and self.in_channels != self.out_channels:
            raise ValueError(
                f"{self._where}: in_channels={self.in_channels} must equal out_channels={self.out_channels}"
            )
        if op is Op.FLATTEN and self.out_channels != self.in_channels * self.in_hw[0] * self.in_hw[1]:
            raise ValueError(f"{self._where}: out_channels must be in_channels*H*W")
        if op in _WINDOWED:
            expected = conv_output_hw(
                self.in_hw, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode
            )
            if expected != self.out_hw:
                raise ValueError(
                    f"{self._where}: out_hw={self.out_hw} but the kernel, stride and padding "
                    f"give {expected} from in_hw={self.in_hw}"
                )
        if op in _MULTI_INPUT:
            if len(self.inputs) < 2:
                raise ValueError(f"{self._where}: needs at least two inputs")
        elif len(self.inputs) != 1:
            raise ValueError(f"{self._where}: takes exactly one input, got {len(self.inputs)}")
        return self

    def _check_spatial_rule(self) -> None:
        """The output size of ops that keep, pad or upsample H and W; LRN's window."""
        op = self.op
        if op in _SAME_HW and self.out_hw != self.in_hw:
            raise ValueError(f"{self._where}: out_hw={self.out_hw} must equal in_hw={self.in_hw}")
        if op is Op.PAD:
            expected = (self.in_hw[0] + 2 * self.padding[0], self.in_hw[1] + 2 * self.padding[1])
            if self.out_hw != expected:
                raise ValueError(
                    f"{self._where}: out_hw={self.out_hw} but padding={self.padding} gives {expected} "
                    f"from in_hw={self.in_hw}"
                )
        elif self.padding != (0, 0) and (op in _SAME_HW or op in UPSAMPLES):
            raise ValueError(f"{self._where}: padding is only meaningful for windowed ops and pad")
        if op in UPSAMPLES and any(o % i for o, i in zip(self.out_hw, self.in_hw, strict=True)):
            raise ValueError(
                f"{self._where}: out_hw={self.out_hw} must be an integer multiple of in_hw={self.in_hw}"
            )
        if op is Op.LRN and self.kernel[1] != 1:
            raise ValueError(f"{self._where}: kernel must be (size, 1), got {self.kernel}")

    def _check_token_rule(self) -> None:
        """Shapes of the ops that re-arrange positions: tokens, class_token, token_select, space_to_depth."""
        op, (h, w) = self.op, self.in_hw
        expected: tuple[int, int] | None = None
        if op is Op.TOKENS:
            expected = (1, h * w)
        elif op is Op.CLASS_TOKEN:
            if h != 1:
                raise ValueError(f"{self._where}: its input must be a token sequence (in_hw (1, N))")
            expected = (1, w + 1)
        elif op is Op.TOKEN_SELECT:
            expected = (1, 1)
        elif op is Op.SPACE_TO_DEPTH:
            expected = (-(-h // 2), -(-w // 2))
            if self.out_channels != 4 * self.in_channels:
                raise ValueError(f"{self._where}: out_channels must be 4 * in_channels")
        if expected is not None and self.out_hw != expected:
            raise ValueError(
                f"{self._where}: out_hw={self.out_hw} must be {expected} from in_hw={self.in_hw}"
            )

    @property
    def _where(self) -> str:
        return f"layer {self.name!r} ({self.op.value})"

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
    input_shape: InputShape
    layers: list[Layer] = Field(min_length=1, max_length=MAX_LAYERS)
    outputs: list[str] = Field(min_length=1, max_length=MAX_LAYERS)

    @model_validator(mode="after")
    def _check_graph(self) -> Network:
        if self.ir_version != IR_VERSION:
            raise ValueError(f"ir_version {self.ir_version} is not supported; this build reads {IR_VERSION}")
        produced: dict[str, tuple[int, tuple[int, int]]] = {
            NETWORK_INPUT: (self.input_shape[1], (self.input_shape[2], self.input_shape[3]))
        }
        names = Counter(layer.name for layer in self.layers)
        if len(names) != len(self.layers):
            dup = sorted(name for name, count in names.items() if count > 1)
            raise ValueError(f"layer names must be unique; repeated: {dup[:10]}")
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
        _check_cost_bounds(self)
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
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise architecture_error(exc) from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise architecture_error(exc) from exc

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
            for field, default in _HASH_OPTIONAL_DEFAULTS.items():
                if attrs[field] == default:
                    del attrs[field]
            digests[layer.name] = _sha(json.dumps([attrs, input_digests], sort_keys=True))
        return _sha(json.dumps([digests[o] for o in self.outputs]))


def architecture_error(exc: ValidationError) -> InvalidArchitecture:
    """The lpnet error for a failed validation of a network: ArchitectureTooLarge when only cost bounds failed."""
    too_large = all(error["type"] == ArchitectureTooLarge.code for error in exc.errors())
    return (ArchitectureTooLarge if too_large else InvalidArchitecture).from_validation_error(exc)


def activation_bytes(network: Network) -> tuple[int, int]:
    """The largest activation tensor and the peak of live activations of a forward pass, in bytes.

    Tensors are counted as float32; each lives from the layer that produces it to its last consumer
    (the input from the start, the outputs to the end), as in a torch.fx module's forward.
    """
    batch = network.input_shape[0]
    last_use: dict[str, int] = {}
    for index, layer in enumerate(network.layers):
        for ref in layer.inputs:
            last_use[ref] = index
    for name in network.outputs:
        last_use[name] = len(network.layers)
    freed_after = [0] * (len(network.layers) + 1)  # bytes released once layer i has run
    live = largest = peak = math.prod(network.input_shape) * BYTES_PER_ELEMENT
    freed_after[last_use[NETWORK_INPUT]] += live
    for index, layer in enumerate(network.layers):
        size = batch * layer.out_channels * layer.out_hw[0] * layer.out_hw[1] * BYTES_PER_ELEMENT
        largest = max(largest, size)
        live += size
        peak = max(peak, live)
        freed_after[last_use.get(layer.name, index)] += size
        live -= freed_after[index]
    return largest, peak


def _check_cost_bounds(network: Network) -> None:
    from lpnet.arch.counting import attention_scores, layer_cost  # counting builds on this module

    batch = network.input_shape[0]
    params = macs = scores = 0
    for layer in network.layers:
        cost = layer_cost(layer, batch)
        params += cost.params
        macs += cost.macs
        if layer.op is Op.ATTENTION:
            scores = max(scores, attention_scores(layer, batch))
    largest, peak = activation_bytes(network)
    _check_bound("parameters", params, MAX_PARAMS, "MAX_PARAMS")
    _check_bound("multiply-accumulates", macs, MAX_MACS, "MAX_MACS")
    _check_bound("bytes in its largest activation (float32)", largest, MAX_TENSOR_BYTES, "MAX_TENSOR_BYTES")
    _check_bound(
        "bytes in its largest attention score tensor (float32)",
        scores * BYTES_PER_ELEMENT,
        MAX_TENSOR_BYTES,
        "MAX_TENSOR_BYTES",
    )
    _check_bound(
        "bytes of activations alive at once (float32)", peak, MAX_ACTIVATION_BYTES, "MAX_ACTIVATION_BYTES"
    )


def _check_bound(what: str, value: int, limit: int, bound: str) -> None:
    if value > limit:
        raise PydanticCustomError(
            ArchitectureTooLarge.code,
            f"the network has {value:,} {what}; at most {limit:,} ({bound}): "
            "use a smaller input, batch or network",
            {"bound": bound, "limit": limit, "value": value},
        )


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
