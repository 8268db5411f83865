"""LPNet: a layer-level latency network whose per-layer predictions plus a learned overhead sum to
the network latency. An ensemble of members gives an interval.

Each layer's time is a physical base times a bounded learned correction:

    ms = (e^a[kind] * MACs + e^b[kind] * elements moved + e^d[kind] + e^c[kind] * cold
          + e^g[kind] * weights * spill) * exp(B * tanh(mlp(features) / B)),
    cold = gap / (gap + e^h),      spill = sigmoid(S * log(weights / (1.05 * spill point)))

The base is work over throughput: a compute rate, a memory rate and a per-call cost per rate kind
(the operator, and for a convolution its kernel kind: dense, 1x1, grouped, depthwise), fitted on the
device's measurements, and a cold-call cost: what a call pays for fetching again the code and data
that the `gap` elements touched since its kind last ran pushed out of the caches, saturating at a
learned traffic e^h; and a price per weight once a layer's weights pass the device's spill point:
the smaller of its last-level cache and the block size past which its C library maps every
allocation afresh (`LPNetConfig.spill_kb`). On a 2-core EPYC with a 32 MB L3 a dense 3x3 convolution
of 960 channels at 7x7, 31.6 MB of weights, ran at 16 GMACs/s and one of 1,024 channels, 36 MB, at
5.6; on a Xeon with a 480 MB L3 at 32 and 20 GMACs/s, the larger one page-faulting its weights'
reordered copy in on every call. The MLP learns what
the base cannot (SIMD staircases in the channel count, cache effects, kernel choice), but only
within a factor e^B either way. Far from the training data the correction saturates and the
prediction falls back to the base, which scales with the work instead of exploding or collapsing
the way an unconstrained network on log features does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lpnet.predictor.features import (
    CORRECTION_FEATURES,
    GAP_INPUTS,
    NUMERIC_FEATURES,
    OPS,
    OWN_WORK_TERMS,
    RATE_KINDS,
    WEIGHTS_TERM,
    TensorizedNetwork,
    channel_basis,
    kind_gaps,
    rate_kinds,
    work_terms,
)

# Channel counts are packed into 16-bit fields of one int64 key by the fast batch path.
_CHANNEL_BITS = 16
# Below this many (vector, layer) rows the plain batched path is faster than deduplication.
_GENERAL_PATH_ROWS = 20_000
# Rows of features whose corrections the batch path computes at once (hidden activations of 1 MB).
_CORRECTION_BLOCK_ROWS = 4096
# The learned correction multiplies the base by at most this factor, either way.
CORRECTION_FACTOR = 4.0
# Base terms per layer: MACs, elements moved, one call, one call's cold share, weights past the spill
# point.
BASE_TERMS = 5
# Weights spill past this multiple of the spill point (`LPNetConfig.spill_kb`, in float32 elements):
# with a 32 MB L3 and a 32 MB mapping threshold, 31.6 MB of convolution weights ran at the in-cache
# rate and 36 MB did not.
SPILL_POINT = 1.05
# How sharply `spill_share` rises around the spill point, per unit of log weights: from 0.1 at the
# spill point's size to 0.9 at 1.11 times it.
SPILL_SHARPNESS = 40.0
# The log spill point of a device whose spill point is unknown: no layer spills.
_NO_CACHE_LOG_WEIGHTS = 1e3
# log elements of traffic that evict half a call's working set, before fitting (2 M: 8 MB of floats).
INITIAL_LOG_CACHE = math.log(2e6)
# The share of unseen networks an interval is meant to hold.
INTERVAL_COVERAGE = 0.9


@dataclass(frozen=True)
class LPNetConfig:
    """Shape of each member and of the ensemble."""

    hidden: int = 64
    depth: int = 1
    op_embedding: int = 8
    members: int = 5
    # The device's last-level cache (KiB, `profiler.environment.last_level_cache_kb`) and the block
    # size (KiB) past which its C library maps every allocation afresh
    # (`profiler.environment.fresh_mapping_kb`): the smaller is where layers' weights start to spill
    # (`spill_kb`). None: unknown.
    last_level_cache_kb: int | None = None
    fresh_mapping_kb: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)

    @property
    def spill_kb(self) -> int | None:
        """Weights (KiB) past which a layer reads them from memory or page-faults their reordered copy
        in on every call: the smaller of the known limits; None when neither is known, and then no
        layer is priced as spilling."""
        known = [kb for kb in (self.last_level_cache_kb, self.fresh_mapping_kb) if kb is not None]
        return min(known) if known else None

    @property
    def log_spill_weights(self) -> float:
        """log float32 weights at which a layer's weights spill (`spill_kb`)."""
        spill_kb = self.spill_kb
        if spill_kb is None:
            return _NO_CACHE_LOG_WEIGHTS
        return math.log(SPILL_POINT * spill_kb * 1024 / 4)


def bounded_correction(raw: torch.Tensor) -> torch.Tensor:
    """Log-correction in (-log F, log F) for an unbounded MLP output."""
    bound = math.log(CORRECTION_FACTOR)
    return bound * torch.tanh(raw / bound)


class LayerLatencyMLP(nn.Module):
    """One ensemble member: per-layer log-latency as a base from the work plus a bounded correction."""

    first: nn.Linear
    head: nn.Linear

    def __init__(self, config: LPNetConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(OPS), config.op_embedding)
        self.first = nn.Linear(len(NUMERIC_FEATURES) + config.op_embedding, config.hidden)
        deeper: list[nn.Module] = []
        for _ in range(config.depth - 1):
            deeper += [nn.SiLU(), nn.Linear(config.hidden, config.hidden)]
        self.deeper = nn.Sequential(*deeper)
        self.head = nn.Linear(config.hidden, 1)
        with torch.no_grad():  # the correction starts at zero: the member starts as its base
            self.head.weight.zero_()
            self.head.bias.zero_()
        # log ms per MAC, per element moved, per call, per cold call and per weight past the spill
        # point, by rate kind (set from the data before fitting).
        self.log_rates = nn.Parameter(torch.zeros(len(RATE_KINDS), BASE_TERMS))
        # A per-network constant (ms): the part of a network's latency that its layers, timed in
        # context, do not account for. There is no per-layer overhead: a layer's in-context time
        # already includes its call's dispatch, and the per-call term of the base prices it.
        self.network_overhead = nn.Parameter(torch.zeros(()))
        # log elements of traffic that evict half of a call's working set (`cold_share`).
        self.log_cache = nn.Parameter(torch.tensor(INITIAL_LOG_CACHE))
        # log weights at which a layer's weights spill (`LPNetConfig.spill_kb`; fixed).
        self.log_spill_weights = config.log_spill_weights

    def correction(self, features: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Bounded log-correction; features (..., F) normalised, ops (...,) -> (...)."""
        x = torch.cat([features, self.embed(ops)], dim=-1)  # (..., F + E)
        hidden = self.deeper(self.first(x))
        return bounded_correction(self.head(torch.nn.functional.silu(hidden)).squeeze(-1))

    def layer_log_ms(
        self, features: torch.Tensor, work: torch.Tensor, ops: torch.Tensor, kinds: torch.Tensor
    ) -> torch.Tensor:
        """Per-layer log-milliseconds: features (..., F) normalised, work (..., 4) (`work_terms`), ops
        and rate kinds (...,) -> (...)."""
        base = base_log_ms(work, self.log_rates[kinds], self.log_cache, self.log_spill_weights)
        return base + self.correction(features, ops)


def cold_share(log_gap: torch.Tensor, log_cache: torch.Tensor) -> torch.Tensor:
    """log(gap / (gap + cache)): how cold a call runs, from the log elements touched since its kind
    last ran and the log traffic that evicts half of what it needs (broadcast)."""
    return log_gap - torch.logaddexp(log_gap, log_cache)


def spill_share(log_weights: torch.Tensor, log_spill_weights: float) -> torch.Tensor:
    """log of the share of a layer's weights priced as spilled: a steep sigmoid of log weights around
    the device's spill point (`LPNetConfig.log_spill_weights`)."""
    return torch.nn.functional.logsigmoid(SPILL_SHARPNESS * (log_weights - log_spill_weights))


def spills(log_weights: torch.Tensor, log_spill_weights: float) -> torch.Tensor:
    """Whether a layer counts as spilled: more than half its weights priced past the spill point."""
    return spill_share(log_weights, log_spill_weights) > math.log(0.5)


def warm_log_ms(work: torch.Tensor, log_rates: torch.Tensor, log_spill_weights: float) -> torch.Tensor:
    """log(e^a MACs + e^b elements + e^d + e^g weights spill), the base without its cold term: work
    (..., 4) (`work_terms`), log_rates (..., 5) -> (...)."""
    own = work[..., :OWN_WORK_TERMS] + log_rates[..., :OWN_WORK_TERMS]
    call = log_rates[..., OWN_WORK_TERMS : OWN_WORK_TERMS + 1]
    weights = work[..., WEIGHTS_TERM]
    spilled = (log_rates[..., 4] + weights + spill_share(weights, log_spill_weights)).unsqueeze(-1)
    return torch.logsumexp(torch.cat([own, call, spilled], -1), -1)


def base_log_ms(
    work: torch.Tensor, log_rates: torch.Tensor, log_cache: torch.Tensor, log_spill_weights: float
) -> torch.Tensor:
    """log(e^a MACs + e^b elements + e^d + e^c cold + e^g weights spill): work (..., 4)
    (`work_terms`), log_rates (..., 5), log_cache broadcast to the layers -> (...)."""
    cold = log_rates[..., 3] + cold_share(work[..., 2], log_cache)
    return torch.logaddexp(warm_log_ms(work, log_rates, log_spill_weights), cold)


def member_log_spread(totals: torch.Tensor) -> torch.Tensor:
    """The ensemble's spread in log space, (K, B) member totals -> (B,), at least 1e-3.

    A robust scale: members are first held within a factor `CORRECTION_FACTOR` of the median member
    (one member far off, such as one whose negative overheads bring a small network near zero, must
    not stretch an interval by orders of magnitude), then 1.4826 x their median absolute deviation
    (the standard deviation for normal data). With two members, their standard deviation; with one,
    1e-3.
    """
    logs = torch.log(totals.clamp_min(1e-4))
    if logs.shape[0] == 1:
        return torch.full_like(logs[0], 1e-3)
    if logs.shape[0] == 2:
        return logs.std(0).clamp_min(1e-3)
    middle = logs.median(0).values
    bound = math.log(CORRECTION_FACTOR)
    held = torch.minimum(torch.maximum(logs, middle - bound), middle + bound)
    deviation = (held - middle).abs()
    return (1.4826 * deviation.median(0).values).clamp_min(1e-3)


class LPNet(nn.Module):
    """An ensemble of LayerLatencyMLP members sharing one feature normalisation."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    feature_low: torch.Tensor
    feature_high: torch.Tensor
    interval_residuals: torch.Tensor
    interval_member: torch.Tensor
    interval_scale: torch.Tensor
    interval_floor: torch.Tensor

    def __init__(self, config: LPNetConfig) -> None:
        super().__init__()
        self.config = config
        self._members = nn.ModuleList(LayerLatencyMLP(config) for _ in range(config.members))
        self.register_buffer("feature_mean", torch.zeros(len(NUMERIC_FEATURES)))
        self.register_buffer("feature_std", torch.ones(len(NUMERIC_FEATURES)))
        # The range of every raw feature over the training layers of each rate kind, (R, F). The
        # correction sees a layer's features held inside its kind's range: beyond what was measured
        # of that kind the correction stays at its value on the edge, and the base alone carries the
        # prediction further, in proportion to the work. (A depthwise convolution wider than any
        # depthwise one measured is held at the widest, even where dense convolutions were wider.)
        shape = (len(RATE_KINDS), len(NUMERIC_FEATURES))
        self.register_buffer("feature_low", torch.full(shape, -math.inf))
        self.register_buffer("feature_high", torch.full(shape, math.inf))
        # Cross-validation+ interval (`interval_bounds`): each calibration network's absolute log
        # error under the one member that never saw it, and that member's index, (N,) each.
        self.register_buffer("interval_residuals", torch.zeros(0))
        self.register_buffer("interval_member", torch.zeros(0, dtype=torch.long))
        # Artifacts of version 5 and older have no residuals: their interval's log half-width is
        # interval_scale * (member spread + interval_floor).
        self.register_buffer("interval_scale", torch.tensor(2.0))
        self.register_buffer("interval_floor", torch.tensor(0.0))

    def set_interval_residuals(self, residuals: torch.Tensor, member: torch.Tensor) -> None:
        """The calibration of `interval_bounds`: absolute log errors (N,) and the member each is of."""
        self.interval_residuals = residuals.detach().float().clone()
        self.interval_member = member.detach().long().clone()

    @property
    def members(self) -> list[LayerLatencyMLP]:
        return [m for m in self._members if isinstance(m, LayerLatencyMLP)]

    def interval_bounds(self, totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low and high ends (ms) of the interval for member totals (K, B) -> (B,) each.

        Cross-validation+ (Barber et al., "Predictive inference with the jackknife+", 2021): every
        calibration network i was left out of member k(i)'s fit, and r_i is that member's absolute
        log error on it. For a new network the interval runs from the `INTERVAL_COVERAGE` lower
        quantile of {log m_k(i) - r_i} to the upper quantile of {log m_k(i) + r_i}: each calibration
        error applied to the member it was measured on. It widens with the members' disagreement
        and with the errors they made on architectures they never saw, without a fitted scale.
        """
        logs = torch.log(totals.clamp_min(1e-4))
        residuals = self.interval_residuals
        if residuals.numel() == 0:
            half = self.interval_scale * (member_log_spread(totals) + self.interval_floor)
            center = torch.log(totals.mean(0))
            return torch.exp(center - half), torch.exp(center + half)
        n = residuals.shape[0]
        alpha = 1.0 - INTERVAL_COVERAGE
        low_rank = min(n, max(1, math.floor(alpha * (n + 1))))
        high_rank = min(n, math.ceil((1.0 - alpha) * (n + 1)))
        per_residual = logs[self.interval_member]  # (N, B)
        low = torch.kthvalue(per_residual - residuals[:, None], low_rank, dim=0).values
        high = torch.kthvalue(per_residual + residuals[:, None], high_rank, dim=0).values
        return torch.exp(low), torch.exp(high)

    def normalise(self, features: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """Raw features (..., F) of layers of rate kinds (...,) held inside their kind's training
        range, then standardised."""
        held = torch.minimum(torch.maximum(features, self.feature_low[kinds]), self.feature_high[kinds])
        return (held - self.feature_mean) / self.feature_std * CORRECTION_FEATURES

    def member_layer_ms(self, features: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Per-layer ms of every member: features (B, L, F) raw, ops (L,) -> (K, B, L)."""
        kinds = rate_kinds(ops, features)  # (B, L)
        x = self.normalise(features, kinds)
        work = work_terms(features)
        if self.config.depth == 1:
            rates = torch.stack([m.log_rates[kinds] for m in self.members])  # (K, B, L, BASE_TERMS)
            caches = torch.stack([m.log_cache for m in self.members]).view(-1, 1, 1)
            base = base_log_ms(work.unsqueeze(0), rates, caches, self.config.log_spill_weights)  # (K, B, L)
            return torch.exp(base + self._stacked_correction(x, ops))
        ops_b = ops.expand(x.shape[:-1])
        return torch.stack([torch.exp(m.layer_log_ms(x, work, ops_b, kinds)) for m in self.members])

    def _stacked_correction(self, x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """`correction` of every one-hidden-layer member at once: x (B, L, F) normalised -> (K, B, L).

        The same arithmetic as the members one by one, as a few batched products instead of five
        small forwards each: what keeps one prediction of a new network within a couple of ms.
        """
        members = self.members
        n_feat = x.shape[-1]
        weight = torch.stack([m.first.weight for m in members])  # (K, H, F + E)
        embedded = torch.stack([m.embed(ops) for m in members])  # (K, L, E)
        per_layer = torch.einsum("kle,khe->klh", embedded, weight[:, :, n_feat:])  # (K, L, H)
        per_layer = per_layer + torch.stack([m.first.bias for m in members])[:, None, :]
        hidden = torch.einsum("blf,khf->kblh", x, weight[:, :, :n_feat]) + per_layer[:, None]  # (K, B, L, H)
        head = torch.stack([m.head.weight[0] for m in members])  # (K, H)
        bias = torch.stack([m.head.bias[0] for m in members])  # (K,)
        raw = torch.einsum("kblh,kh->kbl", torch.nn.functional.silu(hidden), head) + bias[:, None, None]
        return bounded_correction(raw)

    def _chunked_corrections(
        self, features: torch.Tensor, ops: torch.Tensor, kinds: torch.Tensor
    ) -> torch.Tensor:
        """Every member's correction of rows of raw features (U, F), ops and rate kinds (U,) -> (K, U),
        a block of rows at a time, so that the hidden activations stay in the caches."""
        blocks = []
        for start in range(0, features.shape[0], _CORRECTION_BLOCK_ROWS):
            rows = slice(start, start + _CORRECTION_BLOCK_ROWS)
            x = self.normalise(features[rows], kinds[rows])
            blocks.append(torch.stack([member.correction(x, ops[rows]) for member in self.members]))
        return torch.cat(blocks, dim=1)

    def member_overhead_ms(self) -> torch.Tensor:
        """Network overhead of every member (K,)."""
        return torch.stack([m.network_overhead for m in self.members])

    def member_network_ms(self, features: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Network ms of every member: (K, B). Differentiable with respect to the features."""
        layer_ms = self.member_layer_ms(features, ops)  # (K, B, L)
        return layer_ms.sum(-1) + self.member_overhead_ms()[:, None]

    def batch_network_ms(self, tn: TensorizedNetwork, widths: torch.Tensor) -> torch.Tensor:
        """Network ms of every member for many integer width vectors (B, G) -> (K, B), no gradient.

        Each layer's latency depends only on its (input, output) channel counts, so it is computed
        once per distinct (layer, in, out) triple. Exact, and much faster than the general path.
        """
        in_c, out_c = tn.channels(widths)  # (B, L)
        in_i = in_c.round().long()
        out_i = out_c.round().long()
        limit = 1 << _CHANNEL_BITS
        small = widths.shape[0] * tn.num_layers <= _GENERAL_PATH_ROWS
        if small or self.config.depth != 1 or int(in_i.max()) >= limit or int(out_i.max()) >= limit:
            with torch.no_grad():
                return self.member_network_ms(tn.features_from_channels(in_i.float(), out_i.float()), tn.ops)
        batch, num_layers = in_i.shape
        layer = torch.arange(num_layers).expand(batch, num_layers)
        keys = (layer << (2 * _CHANNEL_BITS)) | (in_i << _CHANNEL_BITS) | out_i  # (B, L)
        triples, triple_of = torch.unique(keys.reshape(-1), return_inverse=True)  # (U,), (B*L,)
        u_layer = triples >> (2 * _CHANNEL_BITS)
        u_in = (triples >> _CHANNEL_BITS) & (limit - 1)
        u_out = triples & (limit - 1)
        with torch.no_grad():
            features = _triple_features(
                tn, u_layer, channel_basis(u_in.float()), channel_basis(u_out.float())
            )
            u_ops = tn.ops[u_layer]
            u_kinds = rate_kinds(u_ops, features)
            corrections = self._chunked_corrections(features, u_ops, u_kinds)  # (K, U)
            work = work_terms(features)  # (U, 4); its gap column is not the layer's (below)
            # A layer's gap depends on the widths of the layers around it, so the cold term is
            # computed per width vector, from each layer's weights and activations.
            per_vector = features[:, list(GAP_INPUTS)][triple_of].reshape(batch, num_layers, len(GAP_INPUTS))
            log_gap = kind_gaps(per_vector, tn.gap_start, tn.gap_stop)  # (B, L)
            results = []
            for member, correction in zip(self.members, corrections, strict=True):
                rates = member.log_rates[u_kinds]  # (U, BASE_TERMS)
                warm_log = warm_log_ms(work, rates, member.log_spill_weights) + correction
                warm = torch.exp(warm_log)[triple_of].reshape(batch, num_layers)
                cold_rate = torch.exp(rates[:, 3] + correction)[triple_of].reshape(batch, num_layers)
                layer_ms = warm + cold_rate * torch.sigmoid(log_gap - member.log_cache)  # exp(cold_share)
                results.append(layer_ms.sum(-1))  # (B,)
            return torch.stack(results) + self.member_overhead_ms()[:, None]


def _triple_features(
    tn: TensorizedNetwork, layers: torch.Tensor, in_basis: torch.Tensor, out_basis: torch.Tensor
) -> torch.Tensor:
    """Raw features (U, F) of (layer, in, out) triples sorted by layer, from the channel bases (U, K):
    each layer's affine map applied to its run of rows, without gathering a copy of the maps per row."""
    counts = torch.bincount(layers, minlength=tn.num_layers).tolist()
    features = torch.empty(layers.shape[0], tn.const.shape[1], dtype=tn.const.dtype)
    start = 0
    for layer, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            features[rows] = (
                tn.const[layer]
                + in_basis[rows] @ tn.in_coef[layer].T
                + out_basis[rows] @ tn.out_coef[layer].T
            )
            start += count
    return features
