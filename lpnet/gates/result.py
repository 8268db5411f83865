"""What a plan returns: per-group and per-layer widths, latencies, costs and verification rounds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lpnet.arch.counting import NetworkCost
from lpnet.arch.ir import Network
from lpnet.measurement import MeasuredLatency
from lpnet.predictor.predict import Prediction


@dataclass(frozen=True)
class LatencyEstimate:
    """A predicted latency with its interval (ms)."""

    total_ms: float
    low_ms: float
    high_ms: float

    @classmethod
    def of(cls, prediction: Prediction) -> LatencyEstimate:
        return cls(prediction.total_ms, prediction.low_ms, prediction.high_ms)


@dataclass(frozen=True)
class CostSummary:
    """Multiply-accumulates, FLOPs and parameters of a network."""

    macs: int
    flops: int
    params: int

    @classmethod
    def of(cls, cost: NetworkCost) -> CostSummary:
        return cls(cost.macs, cost.flops, cost.params)


@dataclass(frozen=True)
class GroupPlan:
    """One channel group: how many channels stay and, when weights were given, which.

    `pruning_ratio` is the share of channels removed (0 keeps all). `scores` are the per-channel
    scores the kept channels were chosen by (L1 norms, or W-Gate scores in the weights mode with
    `filters="gates"`): the kept channels are the highest-scoring ones.
    """

    index: int
    channels: int
    kept: int
    pruning_ratio: float
    out_layers: list[str]
    kept_indices: list[int] | None = None
    scores: list[float] | None = None


@dataclass(frozen=True)
class LayerPlan:
    """One layer before and after: channel counts, share of output channels removed, predicted ms."""

    name: str
    op: str
    in_channels: int
    out_channels: int
    kept_in_channels: int
    kept_out_channels: int
    pruning_ratio: float
    predicted_ms_before: float
    predicted_ms_after: float


@dataclass(frozen=True)
class VerificationRound:
    """One plan-and-measure round: the internal budget planned for, and what came out.

    `measured_ms` is judged against the budget (at the nominal speed when probed, see
    `MeasuredLatency`); `measured_raw_ms` is the median as timed and `probe_ms` the speed probe's
    median during it. A plan that could end the loop is timed more than once: `timings_ms` holds
    each timing's judged latency and the three figures above are medians over them.
    `selected` marks the round whose plan was returned.
    """

    round: int
    internal_budget_ms: float
    predicted_ms: float
    measured_ms: float | None
    widths: list[int]
    seconds: float
    selected: bool = False
    measured_raw_ms: float | None = None
    probe_ms: float | None = None
    nominal_probe_ms: float | None = None
    timings_ms: list[float] = field(default_factory=list)

    @classmethod
    def timed(
        cls,
        round_: int,
        internal_budget_ms: float,
        predicted_ms: float,
        widths: Sequence[int],
        seconds: float,
        timings: Sequence[MeasuredLatency],
    ) -> VerificationRound:
        """A round judged on the median of its timings (none: an unverified round)."""
        if not timings:
            return cls(round_, internal_budget_ms, predicted_ms, None, list(widths), seconds)
        median = MeasuredLatency.median(timings)
        return cls(
            round_,
            internal_budget_ms,
            predicted_ms,
            median.ms,
            list(widths),
            seconds,
            measured_raw_ms=median.raw_ms,
            probe_ms=median.probe_ms,
            nominal_probe_ms=median.nominal_probe_ms,
            timings_ms=[t.ms for t in timings],
        )


@dataclass(frozen=True)
class AllocationSummary:
    """How uneven a plan's keep ratios are, and the allocation band it was held to
    (`lpnet.gates.allocation`). The band's fields are None for a plan held to no band (the train
    mode's joint allocation).

    Attributes:
        keep_ratio_min, keep_ratio_max: the smallest and largest share of its channels any group
            keeps (groups the grid allows a single width, narrower than one step, are left out).
        uniform_keep_ratio: the keep ratio every group could share at the budget the plan was made
            for: the band's centre.
        band_low, band_high: the smallest and largest keep ratio the band allows any group, on the
            grid of allowed widths; a plan inside the band keeps between them.
        max_skew, min_keep_ratio: the policy the band comes from.
        groups_outside_band: groups whose width is outside the band (the plan's `warnings` say why).
    """

    keep_ratio_min: float
    keep_ratio_max: float
    uniform_keep_ratio: float | None = None
    band_low: float | None = None
    band_high: float | None = None
    max_skew: float | None = None
    min_keep_ratio: float | None = None
    groups_outside_band: list[int] = field(default_factory=list)


@dataclass
class PlanResult:
    """A latency-budgeted pruning plan.

    Attributes:
        mode: "architecture-only", "weights" or "train".
        budget_ms: the budget asked for.
        widths: kept channels per group (the width vector).
        groups, layers: per-group and per-layer detail.
        predicted: the pruned network's predicted latency and interval.
        unpruned_predicted: the same for the unpruned network.
        min_achievable_ms: predicted latency with every group at its minimum width.
        cost_before, cost_after: MACs, FLOPs and parameters.
        rounds: every plan-and-measure round (one unverified round without a `measure` callable).
        met_budget: whether the last measured latency is at or under the budget; None unverified.
        capacity: the capacity proxy of the plan (0 = unpruned; see `lpnet.gates.capacity`).
        plan_seconds: wall time of planning, verification included.
        pruned_network: the pruned architecture.
        warnings: predictor extrapolation warnings, a plan leaving its allocation band, and anything
            else worth a look.
        allocation: how uneven the keep ratios are, and the band they were held to.
    """

    mode: str
    network_name: str | None
    network_hash: str
    budget_ms: float
    round_to: int
    widths: list[int]
    groups: list[GroupPlan]
    layers: list[LayerPlan]
    predicted: LatencyEstimate
    unpruned_predicted: LatencyEstimate
    min_achievable_ms: float
    cost_before: CostSummary
    cost_after: CostSummary
    rounds: list[VerificationRound]
    met_budget: bool | None
    capacity: float
    plan_seconds: float
    pruned_network: Network
    warnings: list[str] = field(default_factory=list)
    allocation: AllocationSummary | None = None

    @property
    def verified(self) -> bool:
        return any(r.measured_ms is not None for r in self.rounds)

    @property
    def measured_ms(self) -> float | None:
        """The measured latency of the returned plan (its selected round), if it was measured."""
        for r in self.rounds:
            if r.selected:
                return r.measured_ms
        return self.rounds[-1].measured_ms if self.rounds else None

    @property
    def kept_indices(self) -> list[list[int]] | None:
        if any(g.kept_indices is None for g in self.groups):
            return None
        return [list(g.kept_indices or []) for g in self.groups]

    def to_dict(self, include_network: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict (the pruned IR included unless `include_network` is False)."""
        return {
            "mode": self.mode,
            "network_name": self.network_name,
            "network_hash": self.network_hash,
            "budget_ms": self.budget_ms,
            "round_to": self.round_to,
            "widths": list(self.widths),
            "groups": [asdict(g) for g in self.groups],
            "layers": [asdict(layer) for layer in self.layers],
            "predicted": asdict(self.predicted),
            "unpruned_predicted": asdict(self.unpruned_predicted),
            "predicted_speedup": self.unpruned_predicted.total_ms / max(self.predicted.total_ms, 1e-9),
            "min_achievable_ms": self.min_achievable_ms,
            "cost_before": asdict(self.cost_before),
            "cost_after": asdict(self.cost_after),
            "rounds": [asdict(r) for r in self.rounds],
            "verified": self.verified,
            "measured_ms": self.measured_ms,
            "met_budget": self.met_budget,
            "capacity": self.capacity,
            "plan_seconds": self.plan_seconds,
            "warnings": list(self.warnings),
            "allocation": asdict(self.allocation) if self.allocation is not None else None,
            "pruned_network": self.pruned_network.model_dump(mode="json") if include_network else None,
        }
