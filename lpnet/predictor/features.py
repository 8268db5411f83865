"""Per-layer features as differentiable functions of the per-group kept-channel counts.

Every feature of a layer is an affine function of a few basis functions of its input channel
count and of its output channel count, separately:

    features[l] = const[l] + in_coef[l] @ basis(in_c[l]) + out_coef[l] @ basis(out_c[l])

(`log(MACs)` is `log(in_c) + log(out_c) + const` for a conv, and so on). Channel counts are
themselves affine maps of the width vector (`lpnet.arch.groups.ChannelLayout`). So a predictor on
these features can be back-propagated to the widths, and a one-hidden-layer predictor can evaluate
the first layer once per distinct channel count instead of once per (vector, layer) pair. One
feature is not: the memory the layers since a layer's kind last ran touched (`kind_gaps`), which
depends on those layers' widths; it is computed from the other features, and only the predictor's
base uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lpnet.arch.counting import attention_cost
from lpnet.arch.groups import channel_layout
from lpnet.arch.ir import ACTIVATIONS, ELEMENTWISE_BINARY, Layer, Network, Op

FEATURE_SCHEMA_VERSION = 4
OPS: tuple[Op, ...] = tuple(Op)
OP_INDEX: dict[Op, int] = {op: i for i, op in enumerate(OPS)}
# Operators that cost alike (per element, per window...). An op no training network had (relu6 when
# mobilenet_v2 was left out) is predicted like the ops of its class that training saw, instead of
# from an untrained embedding.
OP_CLASSES: dict[str, frozenset[Op]] = {
    "conv": frozenset({Op.CONV2D}),
    "linear": frozenset({Op.LINEAR}),
    "norm": frozenset({Op.BATCHNORM2D}),
    "activation": ACTIVATIONS,
    "pool": frozenset({Op.MAXPOOL2D, Op.AVGPOOL2D, Op.ADAPTIVE_AVGPOOL2D}),
    "binary": ELEMENTWISE_BINARY,
    "concat": frozenset({Op.CONCAT}),
    "reshape": frozenset({Op.FLATTEN}),
    # Copies of (part of) a tensor to a new layout.
    "data_movement": frozenset({Op.SLICE, Op.CHANNEL_SHUFFLE, Op.PAD}),
    # Normalisations across the channels at each position.
    "channel_norm": frozenset({Op.LAYERNORM, Op.LRN, Op.SOFTMAX}),
    "resize": frozenset({Op.UPSAMPLE_NEAREST, Op.UPSAMPLE_BILINEAR}),
    # Re-arrangements of positions: token sequences, the class token and its read, patch merging.
    "token_movement": frozenset({Op.TOKENS, Op.CLASS_TOKEN, Op.TOKEN_SELECT, Op.SPACE_TO_DEPTH}),
    "embedding": frozenset({Op.POSITION_EMBEDDING}),
    "attention": frozenset({Op.ATTENTION}),
}
OP_CLASS: dict[Op, str] = {op: name for name, members in OP_CLASSES.items() for op in members}
NUMERIC_FEATURES: tuple[str, ...] = (
    "log_in_channels",
    "log_out_channels",
    "log_in_area",
    "log_out_area",
    "kernel_area",
    "stride",
    "log_groups",
    "depthwise",
    "bias",
    "log_macs",
    "log_in_elements",
    "log_out_elements",
    "log_params",
    "batch",
    "in_cos8",
    "in_sin8",
    "in_cos16",
    "in_sin16",
    "out_cos8",
    "out_sin8",
    "out_cos16",
    "out_sin16",
    "log_kind_gap_elements",
)
_F = {name: i for i, name in enumerate(NUMERIC_FEATURES)}
# What a layer's base rates (per MAC, per element moved, per call, per cold call) are kept for: every
# op, and a convolution by its kernel kind, since a 1x1, a grouped and a depthwise convolution run
# different kernels whose throughput differs by several times.
CONV_KINDS: tuple[str, ...] = ("conv2d_pointwise", "conv2d_grouped", "conv2d_depthwise")
RATE_KINDS: tuple[str, ...] = (*(op.value for op in OPS), *CONV_KINDS)
RATE_KIND_INDEX: dict[str, int] = {kind: i for i, kind in enumerate(RATE_KINDS)}

# Basis functions of a channel count: log, and its position within blocks of 8 and 16 channels
# (SIMD and cache blocking make latency a staircase in the channel count; a smooth periodic
# encoding lets the model learn the steps while keeping gradients defined for continuous counts).
BASIS: tuple[str, ...] = ("log", "cos8", "sin8", "cos16", "sin16")


def channel_basis(channels: torch.Tensor) -> torch.Tensor:
    """(...,) channel counts -> (..., len(BASIS))."""
    c = channels.clamp_min(1.0)
    a8 = 2 * math.pi * c / 8.0
    a16 = 2 * math.pi * c / 16.0
    return torch.stack([torch.log(c), torch.cos(a8), torch.sin(a8), torch.cos(a16), torch.sin(a16)], dim=-1)


# Ops whose work per output element is their kernel window.
WINDOWED_OPS: frozenset[Op] = frozenset({Op.MAXPOOL2D, Op.AVGPOOL2D, Op.LRN})
_WORK_FEATURES = [_F["log_macs"], _F["log_in_elements"], _F["log_out_elements"], _F["log_params"]]


# Features only the base uses: the correction does not see them, and no value of theirs is an
# extrapolation to warn about. The gap: a network-wide quantity as an MLP input lets the correction
# tell training networks apart instead of learning layers, and the base saturates in it. The bias: a
# profile's biased convolutions are mostly tiny ones (squeeze-excitation), so a correction that saw
# the flag learned to double the price of every biased layer, a wide 1x1 convolution's included;
# the base prices a bias as what it is, one more pass over the output.
BASE_ONLY_FEATURES: frozenset[str] = frozenset({"log_kind_gap_elements", "bias"})
# True on every feature but the base-only ones, in the order of NUMERIC_FEATURES.
CORRECTION_FEATURES = torch.tensor([name not in BASE_ONLY_FEATURES for name in NUMERIC_FEATURES])
# Columns of `work_terms` that measure the layer's own work (the rest describe its context).
OWN_WORK_TERMS = 2
# The column of `work_terms` with the layer's log weights (elements), which decide whether they pass
# the device's spill point (`lpnet.predictor.model.LPNetConfig.spill_kb`).
WEIGHTS_TERM = 3


def work_terms(features: torch.Tensor) -> torch.Tensor:
    """(..., F) raw features -> (..., 4): log MACs, log elements moved (inputs, outputs, twice with a
    bias, and weights), log elements touched since the last layer of the same rate kind ran
    (`kind_gaps`) and log weights (`WEIGHTS_TERM`)."""
    picked = features[..., _WORK_FEATURES]
    output_passes = picked[..., 2] + torch.log1p(features[..., _F["bias"]])
    moved = torch.logsumexp(torch.stack([picked[..., 1], output_passes, picked[..., 3]], dim=-1), dim=-1)
    gap = features[..., _F["log_kind_gap_elements"]]
    return torch.stack([picked[..., 0], moved, gap, picked[..., 3]], dim=-1)


def rate_kinds(ops: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The rate kind of every layer: ops (L,), raw features (..., L, F) -> (..., L) indices into RATE_KINDS.

    A convolution's kind comes from features that do not depend on the widths (depthwise, groups,
    kernel area), so it stays the same for every width vector.
    """
    conv = ops == OP_INDEX[Op.CONV2D]
    depthwise = features[..., _F["depthwise"]] > 0.5
    grouped = features[..., _F["log_groups"]] > 1e-6
    pointwise = (features[..., _F["kernel_area"]] - 1.0 / 9.0).abs() < 1e-6
    base = len(OPS)
    kind = torch.where(
        depthwise,
        base + 2,
        torch.where(grouped, base + 1, torch.where(pointwise, base, OP_INDEX[Op.CONV2D])),
    )
    return torch.where(conv, kind, ops.expand_as(kind))


def kind_ranges(values: torch.Tensor, kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest of each column over the rows of each rate kind: rows (N, D) of kinds
    (N,) -> low and high, (len(RATE_KINDS), D) each; a kind without rows has low +inf, high -inf."""
    index = kinds[:, None].expand_as(values)
    shape = (len(RATE_KINDS), values.shape[1])
    low = torch.full(shape, math.inf, dtype=values.dtype).scatter_reduce(0, index, values, reduce="amin")
    high = torch.full(shape, -math.inf, dtype=values.dtype).scatter_reduce(0, index, values, reduce="amax")
    return low, high


def layer_rate_kind(layer: Layer) -> str:
    """The rate kind of one layer (a name in RATE_KINDS), the kind `rate_kinds` gives its features."""
    if layer.op is not Op.CONV2D:
        return layer.op.value
    if layer.is_depthwise:
        return "conv2d_depthwise"
    if layer.groups > 1:
        return "conv2d_grouped"
    if layer.kernel[0] * layer.kernel[1] == 1:
        return "conv2d_pointwise"
    return Op.CONV2D.value


def _gap_ranges(kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each layer, the layers that ran since the last one of its rate kind, as a range
    [start, stop) over two forwards run back to back; rate kinds (L,) in the order the network runs
    its layers. A kind's first layer runs after its last one of the previous forward, and a layer
    alone of its kind waits a whole forward."""
    count = len(kinds)
    index = np.arange(count)
    previous = np.zeros(count, dtype=int)
    last_seen = {int(kind): i for i, kind in enumerate(kinds.tolist())}
    for i, kind in enumerate(kinds.tolist()):
        previous[i] = last_seen[kind]
        last_seen[kind] = i
    return previous + 1, np.where(previous < index, index, index + count)


# The features `kind_gaps` reads.
GAP_INPUTS: tuple[int, ...] = (_F["log_params"], _F["log_in_elements"], _F["log_out_elements"])


def kind_gaps(inputs: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """log(1 + elements touched by the layers that ran since the last layer of each layer's rate
    kind): the `GAP_INPUTS` columns (..., L, 3) of a network's layers at some widths, ranges (L,)
    (`_gap_ranges`) -> (..., L).

    A call pays for fetching again what the traffic since its kind last ran pushed out of the caches:
    its kernel's code and the interpreter's and dispatcher's data. On a 2-core EPYC a 512x7x7 global
    pool took 13.5 us right after 1 MB had streamed through the caches and 165 us after 64 MB
    (`bench.cache_context`). What a run of layers touches is its weights, each distinct, and its
    activations, which the allocator recycles: the sum of the weights and the largest activation.
    It follows the widths, so a pruned network is priced the same whether it comes as a network or
    as a width vector of the one it prunes.
    """
    params = torch.exp(inputs[..., 0])
    activations = torch.exp(torch.logaddexp(inputs[..., 1], inputs[..., 2]))
    summed = torch.nn.functional.pad(torch.cumsum(torch.cat([params, params], -1), -1), (1, 0))
    weights = summed[..., stop] - summed[..., start]
    twice = torch.cat([activations, activations], -1)  # (..., 2L)
    positions = torch.arange(twice.shape[-1])
    inside = (positions >= start[:, None]) & (positions < stop[:, None])  # (L, 2L)
    if twice.numel() * inside.shape[0] <= _MASKED_MAX_ELEMENTS:
        largest = torch.where(inside, twice.unsqueeze(-2), torch.zeros(())).amax(-1)
    else:  # many width vectors at once: one slice per layer instead of an (..., L, 2L) mask
        largest = torch.stack(
            [
                twice[..., a:b].amax(-1) if b > a else twice[..., 0] * 0
                for a, b in zip(start.tolist(), stop.tolist(), strict=True)
            ],
            dim=-1,
        )
    return torch.log1p(weights + largest)


def with_kind_gaps(features: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """`features` (..., L, F) with the gap feature set by `kind_gaps`."""
    gap = _F["log_kind_gap_elements"]
    gaps = kind_gaps(features[..., list(GAP_INPUTS)], start, stop)
    parts = [features[..., :gap], gaps.unsqueeze(-1), features[..., gap + 1 :]]
    return torch.cat(parts, dim=-1)


# Above this many elements the largest activation of each gap is taken slice by slice.
_MASKED_MAX_ELEMENTS = 4_000_000


def _layer_terms(layers: list[Layer], batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """const (L, F), in_coef (L, F, K) and out_coef (L, F, K) of every layer, vectorised; the gap
    feature is left to `kind_gaps`, since it depends on other layers' widths."""
    n_l, n_f, n_k = len(layers), len(NUMERIC_FEATURES), len(BASIS)
    const = np.zeros((n_l, n_f))
    cin = np.zeros((n_l, n_f, n_k))
    cout = np.zeros((n_l, n_f, n_k))
    # One pass over the layers (attribute access dominates featurising a new network).
    rows = np.array(
        [
            (
                lay.kernel[0] * lay.kernel[1],
                lay.in_hw[0] * lay.in_hw[1],
                lay.out_hw[0] * lay.out_hw[1],
                lay.is_depthwise,
                lay.groups,
                lay.stride[0],
                lay.bias,
                OP_INDEX[lay.op],
            )
            for lay in layers
        ],
        dtype=float,
    ).reshape(n_l, 8)
    kernel, in_area, out_area = rows[:, 0], rows[:, 1], rows[:, 2]
    depthwise = rows[:, 3] > 0
    groups = np.where(depthwise, 1.0, rows[:, 4])
    op_index = rows[:, 7]
    conv = op_index == OP_INDEX[Op.CONV2D]
    linear = op_index == OP_INDEX[Op.LINEAR]
    batchnorm = op_index == OP_INDEX[Op.BATCHNORM2D]
    windowed = np.isin(op_index, [OP_INDEX[op] for op in WINDOWED_OPS])

    cin[:, _F["log_in_channels"], 0] = 1.0
    cout[:, _F["log_out_channels"], 0] = 1.0
    const[:, _F["log_in_area"]] = np.log(in_area)
    const[:, _F["log_out_area"]] = np.log(out_area)
    const[:, _F["kernel_area"]] = kernel / 9.0
    const[:, _F["stride"]] = rows[:, 5]
    const[:, _F["depthwise"]] = depthwise
    const[:, _F["bias"]] = rows[:, 6]
    const[:, _F["batch"]] = math.log(batch)
    cin[depthwise, _F["log_groups"], 0] = 1.0
    const[:, _F["log_groups"]] = np.where(depthwise, 0.0, np.log(groups))
    cin[:, _F["log_in_elements"], 0] = 1.0
    const[:, _F["log_in_elements"]] = np.log(in_area * batch)
    cout[:, _F["log_out_elements"], 0] = 1.0
    const[:, _F["log_out_elements"]] = np.log(out_area * batch)
    # Conv MACs = B * out_area * out_c * (in_c / groups) * k, with in_c / groups == 1 for depthwise.
    const[conv, _F["log_macs"]] = np.log(batch * out_area[conv] * kernel[conv] / groups[conv])
    const[conv, _F["log_params"]] = np.log(kernel[conv] / groups[conv])
    const[linear, _F["log_macs"]] = math.log(batch)
    const[batchnorm, _F["log_params"]] = math.log(2.0)
    dense = conv & ~depthwise
    for feature in ("log_macs", "log_params"):
        cout[conv | linear, _F[feature], 0] = 1.0
        cin[dense | linear, _F[feature], 0] = 1.0
    # Every other op's work: one operation per output element and window position (a pool's kernel,
    # the input positions per output for an adaptive pool, one for elementwise ops and data movement).
    other = ~(conv | linear)
    reducing = op_index == OP_INDEX[Op.ADAPTIVE_AVGPOOL2D]
    window = np.where(windowed, kernel, np.where(reducing, np.maximum(in_area / out_area, 1.0), 1.0))
    const[other, _F["log_macs"]] = np.log(batch * out_area[other] * window[other])
    cout[other, _F["log_macs"], 0] = 1.0
    cout[batchnorm, _F["log_params"], 0] = 1.0
    # An attention's work is not a product of its channel counts (projections grow with C^2, scores
    # with the window): its counts are pinned (never pruned), so its MACs and weights are constants.
    for index, layer in enumerate(layers):
        if layer.op is Op.ATTENTION:
            cost = attention_cost(layer, batch)
            for feature, value in (("log_macs", cost.macs), ("log_params", cost.params)):
                const[index, _F[feature]] = math.log(max(value, 1))
                cin[index, _F[feature], 0] = cout[index, _F[feature], 0] = 0.0
    for prefix, coef in (("in", cin), ("out", cout)):
        for k, basis in enumerate(BASIS[1:], start=1):
            coef[:, _F[f"{prefix}_{basis}"], k] = 1.0
    return const, cin, cout


@dataclass
class TensorizedNetwork:
    """A network's layers as tensors; channel counts are `A @ w + b` of a width vector `w`."""

    network_hash: str
    layer_names: list[str]
    ops: torch.Tensor  # (L,) long
    in_map: torch.Tensor  # (L, G)
    in_bias: torch.Tensor  # (L,)
    out_map: torch.Tensor  # (L, G)
    out_bias: torch.Tensor  # (L,)
    const: torch.Tensor  # (L, F)
    in_coef: torch.Tensor  # (L, F, K)
    out_coef: torch.Tensor  # (L, F, K)
    full_widths: torch.Tensor  # (G,)
    group_divisors: torch.Tensor  # (G,)
    gap_start: torch.Tensor  # (L,) long: the layers since each layer's kind last ran (`kind_gaps`)
    gap_stop: torch.Tensor  # (L,) long

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_groups(self) -> int:
        return int(self.full_widths.numel())

    def channels(self, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output channel counts, each (B, L), for width vectors (B, G)."""
        in_c = widths @ self.in_map.T + self.in_bias  # (B, L)
        out_c = widths @ self.out_map.T + self.out_bias  # (B, L)
        return in_c, out_c

    def layer_features(self, widths: torch.Tensor) -> torch.Tensor:
        """Features (B, L, F) in the order of NUMERIC_FEATURES."""
        in_c, out_c = self.channels(widths)
        return self.features_from_channels(in_c, out_c)

    def features_from_channels(self, in_c: torch.Tensor, out_c: torch.Tensor) -> torch.Tensor:
        """Features (B, L, F) from channel counts (B, L)."""
        in_part = torch.einsum("blk,lfk->blf", channel_basis(in_c), self.in_coef)
        out_part = torch.einsum("blk,lfk->blf", channel_basis(out_c), self.out_coef)
        return with_kind_gaps(self.const + in_part + out_part, self.gap_start, self.gap_stop)


def tensorize(
    network: Network, with_groups: bool = True, dtype: torch.dtype = torch.float32
) -> TensorizedNetwork:
    """Build the tensor view of a network.

    Args:
        network: the network.
        with_groups: resolve its channel groups (torch-pruning, a fraction of a second) so channel
            counts follow a width vector. Without them every count is a constant and the only
            valid width vector is the empty one: enough to predict a fixed network.
        dtype: floating type of the tensors.
    """
    layers = network.layers
    num_layers = len(layers)
    if with_groups:
        layout = channel_layout(network)
        num_groups = len(layout.groups)
        full = [float(g.channels) for g in layout.groups]
        divisors = [float(g.divisor) for g in layout.groups]
    else:
        num_groups, full, divisors = 0, [], []
    in_map = torch.zeros(num_layers, num_groups, dtype=dtype)
    out_map = torch.zeros(num_layers, num_groups, dtype=dtype)
    in_bias = torch.tensor([float(layer.in_channels) for layer in layers], dtype=dtype)
    out_bias = torch.tensor([float(layer.out_channels) for layer in layers], dtype=dtype)
    if with_groups:
        for i, layer in enumerate(layers):
            for expr, amap, bias in (
                (layout.in_expr[layer.name], in_map, in_bias),
                (layout.out_expr[layer.name], out_map, out_bias),
            ):
                bias[i] = expr.constant
                for g, coef in expr.terms:
                    amap[i, g] = coef
    const, in_coef, out_coef = _layer_terms(layers, network.input_shape[0])
    ops = torch.tensor([OP_INDEX[layer.op] for layer in layers], dtype=torch.long)
    # A layer's rate kind depends only on features that no width changes, all of them in `const`.
    gap_start, gap_stop = _gap_ranges(rate_kinds(ops, torch.as_tensor(const)).numpy())
    return TensorizedNetwork(
        network_hash=network.content_hash,
        layer_names=[layer.name for layer in layers],
        ops=ops,
        in_map=in_map,
        in_bias=in_bias,
        out_map=out_map,
        out_bias=out_bias,
        const=torch.as_tensor(const, dtype=dtype),
        in_coef=torch.as_tensor(in_coef, dtype=dtype),
        out_coef=torch.as_tensor(out_coef, dtype=dtype),
        full_widths=torch.tensor(full, dtype=dtype),
        group_divisors=torch.tensor(divisors, dtype=dtype),
        gap_start=torch.as_tensor(gap_start, dtype=torch.long),
        gap_stop=torch.as_tensor(gap_stop, dtype=torch.long),
    )
