"""Predictions from a fitted LPNet: one network, or many width vectors of one network at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lpnet.arch.ir import Network, Op
from lpnet.predictor.features import (
    CONV_KINDS,
    CORRECTION_FEATURES,
    NUMERIC_FEATURES,
    OPS,
    OWN_WORK_TERMS,
    RATE_KIND_INDEX,
    RATE_KINDS,
    WEIGHTS_TERM,
    TensorizedNetwork,
    kind_ranges,
    rate_kinds,
    tensorize,
    work_terms,
)
from lpnet.predictor.model import LPNet, LPNetConfig, member_log_spread, spills

_OP_NAMES: tuple[str, ...] = tuple(op.value for op in OPS)
# How far (in units of the training range) a feature may stray before a result is flagged.
_RANGE_MARGIN = 0.1
# How many times more (or less) work than any layer of its rate kind in training a layer may have
# before a result is flagged, and what share of the predicted total such layers must take: a few
# small layers past the edge cannot move the total much.
WORK_MARGIN = 1.5
WORK_SHARE = 0.05
# Networks, or layers of a rate kind, whose weights passed the spill point before a fit
# prices spilling (`lpnet.predictor.train.initial_log_rates`) and a prediction takes the kind's
# spilled layers as priced (`TrainingDomain.spilled_kinds`).
MIN_SPILLED_LAYERS = 3
# Below this log price per spilled weight (ms), a rate kind has none; what a predictor stored without
# its spilled kinds goes by (a measured price is near 5e-6 ms per weight, log -12).
_UNPRICED_LOG_RATE = -20.0
_WORK_TERMS = ("MACs", "elements moved")


@dataclass(frozen=True)
class LayerPrediction:
    name: str
    op: str
    ms: float


@dataclass(frozen=True)
class Prediction:
    """A network's predicted latency with an interval, per-layer times and extrapolation warnings."""

    total_ms: float
    low_ms: float
    high_ms: float
    overhead_ms: float
    per_layer: list[LayerPrediction]
    warnings: list[str] = field(default_factory=list)

    @property
    def extrapolated(self) -> bool:
        return bool(self.warnings)


@dataclass(frozen=True)
class BatchPrediction:
    """Latencies (ms) of a batch of width vectors, each (B,)."""

    total_ms: torch.Tensor
    low_ms: torch.Tensor
    high_ms: torch.Tensor


@dataclass
class TrainingDomain:
    """What the predictor saw in training: which ops, the range of each feature, and per rate kind
    the range of the work its layers did.

    `work_min` and `work_max` are (len(RATE_KINDS), 2): the smallest and largest log MACs and log
    elements moved of the training layers of each rate kind (`work_terms`); a kind no training
    layer had has min +inf and max -inf. None when the predictor was stored without them.
    `spilled_kinds` are the rate kinds of which at least `MIN_SPILLED_LAYERS` layers timed in context
    held weights past the device's spill point, the layers a kind's own price is fitted from; None
    when the predictor was stored without them.
    """

    ops: set[str]
    feature_min: torch.Tensor
    feature_max: torch.Tensor
    work_min: torch.Tensor | None = None
    work_max: torch.Tensor | None = None
    spilled_kinds: frozenset[str] | None = None

    @classmethod
    def of(
        cls, ops: torch.Tensor, features: torch.Tensor, timed: torch.Tensor, log_spill_weights: float
    ) -> TrainingDomain:
        """The domain of training layers: op indices (N,), raw features (N, F), whether each layer was
        timed in context (N,), and the device's log spill point in weights
        (`LPNetConfig.log_spill_weights`)."""
        kinds = rate_kinds(ops, features)
        terms = work_terms(features)
        work_min, work_max = kind_ranges(terms[..., :OWN_WORK_TERMS], kinds)
        spilled = timed & spills(terms[:, WEIGHTS_TERM], log_spill_weights)
        counts = torch.bincount(kinds[spilled], minlength=len(RATE_KINDS))
        return cls(
            ops={OPS[i].value for i in ops.unique().tolist()},
            feature_min=features.min(0).values,
            feature_max=features.max(0).values,
            work_min=work_min,
            work_max=work_max,
            spilled_kinds=frozenset(
                RATE_KINDS[i] for i in (counts >= MIN_SPILLED_LAYERS).nonzero().flatten()
            ),
        )

    def warnings_for(
        self, tn: TensorizedNetwork, features: torch.Tensor, layer_ms: torch.Tensor
    ) -> list[str]:
        """Warnings for layers with unseen ops, features far outside the training range, or far
        more or less work than any training layer of their rate kind; features (L, F) raw, layer_ms
        (L,) the predicted time of each layer."""
        warnings = self._op_warnings(tn)
        warnings += self._work_warnings(tn, features, layer_ms)
        warnings += self._feature_warnings(tn, features)
        return warnings

    def _op_warnings(self, tn: TensorizedNetwork) -> list[str]:
        warnings: list[str] = []
        seen = torch.tensor([op.value in self.ops for op in OPS])
        unseen_rows = (~seen[tn.ops]).nonzero().flatten().tolist()
        unseen: dict[str, list[str]] = {}
        for row in unseen_rows:
            unseen.setdefault(OPS[int(tn.ops[row])].value, []).append(tn.layer_names[row])
        for op, names in unseen.items():
            warnings.append(
                f"op {op!r} was never measured on this device (layers {_names(names)}): its latency is "
                "extrapolated"
            )
        return warnings

    def _work_warnings(
        self, tn: TensorizedNetwork, features: torch.Tensor, layer_ms: torch.Tensor
    ) -> list[str]:
        """One warning per rate kind whose layers lie outside, or were never in, its training range,
        when they take at least `WORK_SHARE` of the predicted total.

        A layer of an op training saw but of a rate kind it did not (a grouped convolution when only
        dense ones were measured) is priced at rates fitted on other kinds.
        """
        if self.work_min is None or self.work_max is None:
            return []
        kinds = rate_kinds(tn.ops, features)  # (L,)
        work = work_terms(features)[..., :OWN_WORK_TERMS]  # (L, 2)
        low, high = self.work_min[kinds], self.work_max[kinds]  # (L, 2)
        margin = math.log(WORK_MARGIN)
        never = torch.isinf(low).any(-1)  # (L,)
        seen = ~never[:, None]
        zero = torch.zeros_like(work)
        # Log factor by which each layer's work lies past its kind's range and the margin, (L, 2).
        above = torch.where(seen, (work - high - margin).clamp_min(0.0), zero)
        below = torch.where(seen, (low - work - margin).clamp_min(0.0), zero)
        total = float(layer_ms.sum()) or 1.0
        warnings: list[str] = []
        for kind in kinds.unique().tolist():
            rows = kinds == kind
            names = [tn.layer_names[i] for i in rows.nonzero().flatten().tolist()]
            if bool(never[rows].any()):
                # An op training never saw is already named by `_op_warnings`.
                if RATE_KINDS[kind] in CONV_KINDS and Op.CONV2D.value in self.ops:
                    warnings.append(
                        f"no {RATE_KINDS[kind]} layer was measured on this device (layers {_names(names)}): "
                        "their latency is priced from other kinds"
                    )
                continue
            for excess, direction in ((above, "more"), (below, "less")):
                kind_excess = excess[rows]  # (n, 2)
                flagged = (kind_excess > 0).any(-1)  # (n,)
                share = float(layer_ms[rows][flagged].sum()) / total
                if not bool(flagged.any()) or share < WORK_SHARE:
                    continue
                worst, term = divmod(int(kind_excess.argmax()), 2)
                layer = [n for n, f in zip(names, flagged.tolist(), strict=True) if f]
                factor = math.exp(float(kind_excess[worst, term]) + margin)
                extreme = f"{factor:.1f}x the {_WORK_TERMS[term]} of the largest"
                if direction == "less":
                    extreme = f"1/{factor:.1f} of the {_WORK_TERMS[term]} of the smallest"
                warnings.append(
                    f"{len(layer)} {RATE_KINDS[kind]} layer(s) ({_names(layer)}), {share:.0%} of the predicted "
                    f"time, do {direction} work than any measured on this device: {extreme}"
                )
        return warnings

    def _feature_warnings(self, tn: TensorizedNetwork, features: torch.Tensor) -> list[str]:
        warnings: list[str] = []
        span = (self.feature_max - self.feature_min).clamp_min(1e-6)
        low = self.feature_min - _RANGE_MARGIN * span
        high = self.feature_max + _RANGE_MARGIN * span
        outside = ((features < low) | (features > high)) & CORRECTION_FEATURES  # (L, F)
        for layer_index, feature_index in outside.nonzero().tolist()[:5]:
            value = float(features[layer_index, feature_index])
            warnings.append(
                f"layer {tn.layer_names[layer_index]!r}: {NUMERIC_FEATURES[feature_index]}={value:.3g} is outside "
                f"the training range [{float(self.feature_min[feature_index]):.3g}, "
                f"{float(self.feature_max[feature_index]):.3g}]"
            )
        if int(outside.any(-1).sum()) > 5:
            warnings.append(f"{int(outside.any(-1).sum())} layers in all are outside the training range")
        return warnings


def _size(kb: float) -> str:
    return f"{kb:.0f} KB" if kb < 1024 else f"{kb / 1024:.0f} MB"


def _spill_point(config: LPNetConfig) -> str:
    """What the device's spill point is, for a warning."""
    if config.spill_kb == config.fresh_mapping_kb:
        return (
            f"the {_size(config.spill_kb or 0)} past which this device's allocator maps a convolution's "
            "reordered weights afresh on every call"
        )
    return f"this device's {_size(config.spill_kb or 0)} last-level cache"


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + ("..." if len(names) > 3 else "")


class LatencyPredictor:
    """A fitted LPNet with its training domain: the object the service and the planner use."""

    def __init__(self, model: LPNet, domain: TrainingDomain) -> None:
        self.model = model.eval()
        self.domain = domain

    def predict(self, network: Network) -> Prediction:
        """Latency of one network."""
        tn = tensorize(network, with_groups=False)
        with torch.no_grad():
            features = tn.layer_features(torch.zeros(1, 0))  # (1, L, F)
            layer_ms = self.model.member_layer_ms(features, tn.ops)[:, 0]  # (K, L)
            overheads = self.model.member_overhead_ms()  # (K,)
            totals = layer_ms.sum(-1) + overheads  # (K,)
            total, low, high = self._interval(totals[:, None])
        mean_layer = layer_ms.mean(0).tolist()
        per_layer = [
            LayerPrediction(name, _OP_NAMES[op], ms)
            for name, op, ms in zip(tn.layer_names, tn.ops.tolist(), mean_layer, strict=True)
        ]
        return Prediction(
            total_ms=float(total[0]),
            low_ms=float(low[0]),
            high_ms=float(high[0]),
            overhead_ms=float(overheads.mean()),
            per_layer=per_layer,
            warnings=self.domain.warnings_for(tn, features[0], layer_ms.mean(0))
            + self._spill_warnings(tn, features[0], layer_ms.mean(0)),
        )

    def _spill_warnings(
        self, tn: TensorizedNetwork, features: torch.Tensor, layer_ms: torch.Tensor
    ) -> list[str]:
        """One warning per convolution kind whose layers' weights pass the device's spill point
        (`LPNetConfig.spill_kb`) when fewer than `MIN_SPILLED_LAYERS` layers of that kind timed in
        context spilled in training (`TrainingDomain.spilled_kinds`; for a predictor stored without
        them, when the kind's price per spilled weight is zero), and the layers take at least
        `WORK_SHARE` of the predicted total.

        Only convolutions: they copy their weights into oneDNN's layout on every call and read them
        again for every tile of output positions, which past the spill point costs several times their
        work (`lpnet.predictor.model`); a linear layer at batch 1 reads each weight once wherever it
        lives, and already pays for moving it.
        """
        config = self.model.config
        if config.spill_kb is None:
            return []
        kinds = rate_kinds(tn.ops, features)  # (L,)
        log_weights = work_terms(features)[:, WEIGHTS_TERM]
        spilled = spills(log_weights, config.log_spill_weights)
        unpriced = self._unpriced_spill_kinds()  # (R,)
        total = float(layer_ms.sum()) or 1.0
        warnings: list[str] = []
        convolutions = {RATE_KIND_INDEX[kind] for kind in (Op.CONV2D.value, *CONV_KINDS)}
        for kind in kinds[spilled].unique().tolist():
            if kind not in convolutions:
                continue
            rows = spilled & (kinds == kind)
            share = float(layer_ms[rows].sum()) / total
            if not bool(unpriced[kind]) or share < WORK_SHARE:
                continue
            names = [tn.layer_names[i] for i in rows.nonzero().flatten().tolist()]
            largest_kb = math.exp(float(log_weights[rows].max())) * 4 / 1024
            warnings.append(
                f"{len(names)} {RATE_KINDS[kind]} layer(s) ({_names(names)}), {share:.0%} of the predicted time, "
                f"hold up to {_size(largest_kb)} of weights, more than {_spill_point(config)}, and no "
                f"{RATE_KINDS[kind]} layer that large was measured on it: such layers can run several times "
                "slower than their work suggests"
            )
        return warnings

    def _unpriced_spill_kinds(self) -> torch.Tensor:
        """(len(RATE_KINDS),) bool: the kinds too few of whose timed layers spilled to price them."""
        spilled = self.domain.spilled_kinds
        if spilled is not None:
            return torch.tensor([kind not in spilled for kind in RATE_KINDS])
        rates = torch.stack([member.log_rates[:, 4] for member in self.model.members])  # (K, R)
        return torch.logsumexp(rates, 0) - math.log(rates.shape[0]) < _UNPRICED_LOG_RATE

    def log_spread(self, network: Network) -> float:
        """How far the ensemble's members disagree on a network: their robust spread of log latency
        (`member_log_spread`), relative whatever the network's size. Higher means less sure."""
        tn = tensorize(network, with_groups=False)
        with torch.no_grad():
            totals = self.model.member_network_ms(tn.layer_features(torch.zeros(1, 0)), tn.ops)  # (K, 1)
        return float(member_log_spread(totals)[0])

    def predict_widths(self, tn: TensorizedNetwork, widths: torch.Tensor) -> BatchPrediction:
        """Latencies of many width vectors (B, G) of one tensorised network (no gradient)."""
        with torch.no_grad():
            totals = self.model.batch_network_ms(tn, widths)  # (K, B)
            total, low, high = self._interval(totals)
        return BatchPrediction(total, low, high)

    def latency(self, tn: TensorizedNetwork, widths: torch.Tensor, members: bool = False) -> torch.Tensor:
        """Differentiable latency (ms) of width vectors (B, G): ensemble mean (B,), or (K, B)."""
        features = tn.layer_features(widths)
        totals = self.model.member_network_ms(features, tn.ops)  # (K, B)
        return totals if members else totals.mean(0)

    def _interval(self, totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The point prediction is the members' mean, so per-layer means plus the mean overhead add
        # up to it exactly; the interval (`LPNet.interval_bounds`) always holds it.
        center = totals.mean(0)
        low, high = self.model.interval_bounds(totals)
        return center, torch.minimum(low, center), torch.maximum(high, center)
