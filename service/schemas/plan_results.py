"""A plan job's result as stored and answered: `lpnet.gates.result.PlanResult.to_dict` and the predictor
it was planned with.

Each nested model mirrors a dataclass of `lpnet.gates.result` (stored with `dataclasses.asdict`), field
for field; the dataclasses are not imported, since they pull in torch, which request and answer
schemas do without. Fields added to a dataclass after plans were first stored have defaults there,
and are optional here: an older plan's result lacks them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from lpnet.arch.ir import Network
from lpnet.gates.options import PlanMode
from service.schemas.documents import SchemaOf, StoredDocument

NetworkDocument = Annotated[dict[str, Any], SchemaOf(Network)]
"""A network in the JSON IR, as stored (`lpnet.arch.ir.Network`)."""


class LatencyEstimateRead(StoredDocument):
    """A predicted latency with its interval (ms)."""

    total_ms: float
    low_ms: float
    high_ms: float


class CostSummaryRead(StoredDocument):
    """Multiply-accumulates, FLOPs and parameters of a network."""

    macs: int
    flops: int
    params: int


class GroupPlanRead(StoredDocument):
    """One channel group: how many channels stay and, when weights were given, which."""

    index: int
    channels: int
    kept: int
    pruning_ratio: float = Field(description="Share of the group's channels removed (0 keeps all).")
    out_layers: list[str] = Field(description="Layers whose output channels the group is.")
    kept_indices: list[int] | None = Field(
        default=None, description="The channels kept, when the plan was made with weights."
    )
    scores: list[float] | None = Field(
        default=None,
        description="Per-channel scores the kept channels were chosen by (L1 norms, or W-Gate scores in "
        "the weights mode with filters gates): the kept channels are the highest-scoring ones.",
    )


class LayerPlanRead(StoredDocument):
    """One layer before and after pruning: channel counts, share of output channels removed, predicted ms."""

    name: str
    op: str = Field(description="The layer's IR operator.")
    in_channels: int
    out_channels: int
    kept_in_channels: int
    kept_out_channels: int
    pruning_ratio: float
    predicted_ms_before: float
    predicted_ms_after: float


class VerificationRoundRead(StoredDocument):
    """One plan-and-measure round: the internal budget planned for, and what came out.

    `measured_ms` is judged against the budget (at the predictor's nominal speed when probed);
    `measured_raw_ms` is the median as timed and `probe_ms` the speed probe's median during it. A plan
    that could end the loop is timed more than once: `timings_ms` holds each timing's judged latency
    and the three figures above are medians over them.
    """

    round: int
    internal_budget_ms: float
    predicted_ms: float
    measured_ms: float | None = Field(description="Null for a round that was not measured.")
    widths: list[int]
    seconds: float
    selected: bool = Field(default=False, description="Whether this round's plan is the one returned.")
    measured_raw_ms: float | None = None
    probe_ms: float | None = None
    nominal_probe_ms: float | None = None
    timings_ms: list[float] = Field(default_factory=list)


class AllocationSummaryRead(StoredDocument):
    """How uneven a plan's keep ratios are, and the allocation band it was held to.

    The band's fields are null for a plan held to no band.
    """

    keep_ratio_min: float = Field(description="The smallest share of its channels any group keeps.")
    keep_ratio_max: float = Field(description="The largest share of its channels any group keeps.")
    uniform_keep_ratio: float | None = Field(
        default=None, description="The keep ratio every group could share at the budget: the band's centre."
    )
    band_low: float | None = Field(default=None, description="The smallest keep ratio the band allows.")
    band_high: float | None = Field(default=None, description="The largest keep ratio the band allows.")
    max_skew: float | None = None
    min_keep_ratio: float | None = None
    groups_outside_band: list[int] = Field(
        default_factory=list, description="Groups whose width is outside the band (the warnings say why)."
    )


class PlanResultRead(StoredDocument):
    """A latency-budgeted pruning plan: widths, per-group and per-layer detail, latencies, costs, rounds."""

    mode: PlanMode = Field(description="How the plan was made.")
    network_name: str | None
    network_hash: str = Field(description="content_hash of the unpruned network.")
    budget_ms: float
    round_to: int
    widths: list[int] = Field(description="Kept channels per group (the width vector).")
    groups: list[GroupPlanRead]
    layers: list[LayerPlanRead]
    predicted: LatencyEstimateRead = Field(description="The pruned network's predicted latency.")
    unpruned_predicted: LatencyEstimateRead = Field(description="The unpruned network's predicted latency.")
    predicted_speedup: float = Field(description="Unpruned over pruned predicted latency.")
    min_achievable_ms: float = Field(description="Predicted latency with every group at its minimum width.")
    cost_before: CostSummaryRead
    cost_after: CostSummaryRead
    rounds: list[VerificationRoundRead] = Field(
        description="Every plan-and-measure round (one unmeasured round without verify)."
    )
    verified: bool = Field(description="Whether any round was measured.")
    measured_ms: float | None = Field(description="The returned plan's measured latency, if it was measured.")
    met_budget: bool | None = Field(
        description="Whether the returned plan measured at or under the budget; null unverified."
    )
    capacity: float = Field(description="Capacity proxy of the plan (0: unpruned).")
    plan_seconds: float = Field(description="Wall time of planning, verification included.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Predictor extrapolation, a plan leaving its allocation band, and anything else worth a look.",
    )
    allocation: AllocationSummaryRead | None = Field(
        default=None, description="How uneven the keep ratios are, and the band they were held to."
    )
    pruned_network: NetworkDocument | None = Field(description="The pruned architecture.")
    predictor_id: int = Field(description="The predictor the plan was made with.")
