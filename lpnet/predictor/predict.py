"""Predictions from a fitted LPNet: one network, or many width vectors of one network at once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lpnet.arch.ir import Network
from lpnet.predictor.features import NUMERIC_FEATURES, OPS, TensorizedNetwork, tensorize
from lpnet.predictor.model import LPNet, member_log_spread

_OP_NAMES: tuple[str, ...] = tuple(op.value for op in OPS)
# How far (in units of the training range) a feature may stray before a result is flagged.
_RANGE_MARGIN = 0.1


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
    """What the predictor saw in training: which ops and the range of each feature."""

    ops: set[str]
    feature_min: torch.Tensor
    feature_max: torch.Tensor

    def warnings_for(self, tn: TensorizedNetwork, features: torch.Tensor) -> list[str]:
        """Warnings for layers with unseen ops or features far outside the training range."""
        warnings: list[str] = []
        seen = torch.tensor([op.value in self.ops for op in OPS])
        unseen_rows = (~seen[tn.ops]).nonzero().flatten().tolist()
        unseen: dict[str, list[str]] = {}
        for row in unseen_rows:
            unseen.setdefault(OPS[int(tn.ops[row])].value, []).append(tn.layer_names[row])
        for op, names in unseen.items():
            warnings.append(
                f"op {op!r} was never measured on this device (layers {', '.join(names[:3])}"
                f"{'...' if len(names) > 3 else ''}): its latency is extrapolated"
            )
        span = (self.feature_max - self.feature_min).clamp_min(1e-6)
        low = self.feature_min - _RANGE_MARGIN * span
        high = self.feature_max + _RANGE_MARGIN * span
        outside = (features < low) | (features > high)  # (L, F)
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
            warnings=self.domain.warnings_for(tn, features[0]),
        )

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
        # up to it exactly; the interval is the calibrated log-space spread around it.
        center = totals.mean(0)
        half = self.model.interval_half_width(totals)
        return center, center * torch.exp(-half), center * torch.exp(half)
