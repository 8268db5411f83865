"""Plan per-group widths that meet a latency budget, optionally verified by measurement.

Modes:

- `architecture-only`: no weights. Optimises continuous per-group widths through LPNet to maximise
  the capacity proxy (`lpnet.gates.capacity`) under the latency constraint (augmented Lagrangian),
  then rounds them onto the staircase (`lpnet.gates.budget`). Takes a second or two, resnet50
  included.
- `weights`: a state dict is given. W-Gates score every filter from its weights and are trained,
  weights frozen, to keep the network's outputs on BatchNorm-synthesised inputs
  (`lpnet.gates.datafree`) under the budget. The plan adds which filters stay: the highest-scoring ones.
- `train`: W-Gates trained jointly with the network on a dataset; see
  `lpnet.gates.training.train_and_prune` (it needs data loaders, so it is not reachable from `plan`).

Every mode plans inside the allocation band (`lpnet.gates.allocation`): each group's keep ratio stays
within `max_skew` of the uniform keep ratio that meets the budget, and at least `min_keep_ratio`; a
plan that cannot meet its budget inside the band says so in its warnings.

Verification: with a `measure` callable (the caller owns measurement; lpnet never imports the
profiler), the pruned network is measured; if it is over budget (or far under it), planning repeats
for an internal budget corrected by measured / predicted, for at most `max_rounds` rounds (see
`verification_loop`). Every round is reported, and the one returned is marked. In the weights mode,
later rounds reuse the trained gates and only move the widths (re-training them would cost minutes
for a few percent of latency).

With weights in the architecture-only mode, the widths come from the capacity proxy and the kept
filters are the largest by L1 norm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch

from lpnet.arch.counting import network_cost
from lpnet.arch.groups import ChannelLayout, apply_width_vector, channel_layout
from lpnet.arch.ir import Network
from lpnet.errors import BudgetInfeasible, InvalidPlanOptions, NoPrunableGroups
from lpnet.gates.allocation import (
    DEFAULT_MAX_SKEW,
    DEFAULT_MIN_KEEP_RATIO,
    GRID_FLOOR_RATIO,
    AllocationBand,
    AllocationPolicy,
    BandedFit,
    unbanded_summary,
)
from lpnet.gates.budget import (
    AugmentedLagrangian,
    WidthGrid,
    check_feasible,
    fit_widths_to_budget,
    predicted_latency,
    width_grid,
)
from lpnet.gates.capacity import CapacityProxy
from lpnet.gates.datafree import DataFreeConfig, optimise_gates_datafree, synthesize_inputs
from lpnet.gates.result import (
    CostSummary,
    GroupPlan,
    LatencyEstimate,
    LayerPlan,
    MeasuredLatency,
    PlanResult,
    VerificationRound,
)
from lpnet.gates.wgates import GateSet, WGateConfig
from lpnet.predictor.features import TensorizedNetwork, tensorize
from lpnet.predictor.predict import LatencyPredictor
from lpnet.pruning import group_l1_scores, module_with_weights, top_k_indices

logger = logging.getLogger(__name__)

MeasureFn = Callable[[Network], float | MeasuredLatency]
"""Measures a (pruned) network: its median in ms, or a `MeasuredLatency` when speed-probed."""


class PlanMode(StrEnum):
    ARCHITECTURE_ONLY = "architecture-only"
    WEIGHTS = "weights"
    TRAIN = "train"


@dataclass(frozen=True)
class PlanOptions:
    """How to plan.

    Attributes:
        mode: None picks `weights` when weights are given, else `architecture-only`.
        round_to: kept counts are multiples of this (and of each group's divisor).
        max_skew: each group's keep ratio stays within this factor (at least 1) of the uniform keep
            ratio that meets the budget (None: no such bound); see `lpnet.gates.allocation`.
        min_keep_ratio: no group keeps less than this share of its channels, in (0, 1], unless the
            budget needs a uniform keep ratio under it (the plan then warns).
        safety_margin: plan for budget * (1 - margin) from the first round (0: rely on verification).
        max_rounds: plan-and-measure rounds when a `measure` callable is given.
        verify_margin: verified plans aim at measuring budget * (1 - margin) (timing noise).
        verify_timings: a plan whose first timing is at or under the budget is timed this many
            times in all and judged on the median (see `verification_loop`).
        accept_band: a round measuring within this share under the budget ends verification.
        steps: optimisation steps of the architecture-only mode.
        learning_rate: its Adam learning rate (on the logits of the keep ratios).
        rho: augmented-Lagrangian penalty weight.
        dual_rate: multiplier step per optimisation step, per unit of relative violation.
        gates: W-Gate network settings (weights mode).
        datafree: synthesis and gate-training settings (weights mode).
        seed: random seed.
    """

    mode: PlanMode | None = None
    round_to: int = 8
    max_skew: float | None = DEFAULT_MAX_SKEW
    min_keep_ratio: float = DEFAULT_MIN_KEEP_RATIO
    safety_margin: float = 0.0
    max_rounds: int = 5
    verify_margin: float = 0.04
    verify_timings: int = 2
    accept_band: float = 0.10
    steps: int = 300
    learning_rate: float = 0.1
    rho: float = 20.0
    dual_rate: float = 1.0
    gates: WGateConfig = field(default_factory=WGateConfig)
    datafree: DataFreeConfig = field(default_factory=DataFreeConfig)
    seed: int = 0

    @property
    def allocation(self) -> AllocationPolicy:
        """The allocation band's policy (raises InvalidPlanOptions for a skew under 1 or a minimum
        outside (0, 1])."""
        return AllocationPolicy(self.max_skew, self.min_keep_ratio)


@dataclass
class PlanningProblem:
    """Everything a plan needs about one network and one predictor, computed once."""

    network: Network
    predictor: LatencyPredictor
    layout: ChannelLayout
    tn: TensorizedNetwork
    grid: WidthGrid
    capacity: CapacityProxy

    @classmethod
    def build(
        cls,
        network: Network,
        predictor: LatencyPredictor,
        round_to: int = 8,
        floor_ratio: float = GRID_FLOOR_RATIO,
    ) -> PlanningProblem:
        """Resolve groups, tensorise, and lay out the width grid (no group under `floor_ratio` of its
        channels, `AllocationPolicy.grid_floor_ratio`).

        Raises:
            NoPrunableGroups: the network has nothing to prune.
        """
        layout = channel_layout(network)
        if not layout.groups:
            raise NoPrunableGroups(
                f"network {network.name or network.content_hash[:12]!r} has no prunable channel groups "
                "(every conv/linear output is the network's output or feeds it unchanged)"
            )
        tn = tensorize(network)
        grid = width_grid(layout, round_to, floor_ratio)
        return cls(network, predictor, layout, tn, grid, CapacityProxy(network, tn))

    def __post_init__(self) -> None:
        self._step = torch.as_tensor(self.grid.step, dtype=torch.float32)  # (G,)
        self._low = torch.as_tensor(self.grid.min_widths, dtype=torch.float32)  # (G,)
        self._full = torch.as_tensor(self.grid.full_widths, dtype=torch.float32)  # (G,)

    def snap(self, widths: torch.Tensor) -> torch.Tensor:
        """The nearest grid widths (B, G) of continuous widths (B, G), no gradient."""
        with torch.no_grad():
            return torch.minimum(
                torch.maximum(torch.round(widths / self._step) * self._step, self._low), self._full
            )

    def latency(self, widths: torch.Tensor) -> torch.Tensor:
        """Differentiable predicted latency (B,) of continuous width vectors (B, G), for optimisation.

        LPNet is evaluated at the nearest grid widths, with a straight-through gradient: predictors
        are fitted on measured networks whose widths are multiples of 8, and between those points
        their staircase features can extrapolate wildly (orders of magnitude), while plans only ever
        land on grid widths. The ensemble is summarised by the geometric mean of its members so one
        diverging member cannot dominate the gradient; budgets are checked on the reported
        prediction (the members' arithmetic mean), see `reported_latency`.
        """
        snapped = widths + (self.snap(widths) - widths).detach()  # grid values forward, identity backward
        return self._geometric_latency(snapped)

    def step_latency(self, widths: torch.Tensor) -> torch.Tensor:
        """`latency`'s value with the secant slope across one grid step each way as its gradient.

        Latency is a staircase in each width, and the predictor's derivative at a grid point says
        nothing of whether the next step costs a millisecond or nothing at all. Gates that follow
        it shut channels that cost no time (e.g. 24 -> 8 channels of an early layer whose latency is
        flat there) and the final rounding hands them back untrained; the gate modes use this
        instead. It costs 2G width vectors per row (`grid_slopes`), which the architecture-only
        mode's hundreds of steps on a large network do not need.
        """
        snapped = self.snap(widths)  # (B, G), no gradient
        with torch.no_grad():
            value = self._geometric_latency(snapped)  # (B,)
        if not widths.requires_grad:
            return value
        linear = (widths * self.grid_slopes(snapped)).sum(-1)  # (B,): gradient = slopes
        return value + linear - linear.detach()

    def grid_slopes(self, snapped: torch.Tensor) -> torch.Tensor:
        """Latency per channel (B, G) across one grid step down and one up from grid widths (B, G).

        One-sided at the ends of a group's range; 0 for a group that cannot move. One batched
        predictor call of 2G width vectors per row.
        """
        batch, groups = snapped.shape
        eye = torch.eye(groups, dtype=snapped.dtype)  # (G, G)
        up = torch.minimum(snapped[:, None, :] + eye * self._step, self._full)  # (B, G, G)
        down = torch.maximum(snapped[:, None, :] - eye * self._step, self._low)  # (B, G, G)
        # A step that leaves the grid (e.g. past a full width that is not a multiple of the step)
        # is clamped, so the run is measured between the clamped ends.
        run = torch.diagonal(up, dim1=1, dim2=2) - torch.diagonal(down, dim1=1, dim2=2)  # (B, G)
        with torch.no_grad():
            lat = self._geometric_latency(torch.cat([up, down], 1).reshape(-1, groups))
        lat = lat.reshape(batch, 2 * groups)
        rise = lat[:, :groups] - lat[:, groups:]  # (B, G)
        return torch.where(run > 0, rise / run.clamp_min(1e-6), torch.zeros_like(rise))

    def _geometric_latency(self, widths: torch.Tensor) -> torch.Tensor:
        members = self.predictor.latency(self.tn, widths, members=True)  # (K, B)
        return torch.exp(torch.log(members.clamp_min(1e-4)).mean(0))  # (B,)

    def reported_latency(self, widths: torch.Tensor) -> torch.Tensor:
        """The latency (B,) a plan reports (`predict(...).total_ms`, no gradient).

        The ensemble's reported centre and the mean the optimiser differentiates can differ; budgets
        are checked on what is reported, so a plan never reports a prediction over its budget.
        """
        return self.predictor.predict_widths(self.tn, widths).total_ms

    def fit(
        self,
        target: Sequence[float],
        budget_ms: float,
        ceiling: Sequence[float] | None = None,
        floor: Sequence[float] | None = None,
    ) -> list[int]:
        """Grid widths near `target` predicted at or under `budget_ms` (see `fit_widths_to_budget`)."""
        return fit_widths_to_budget(
            target, self.grid, self.reported_latency, self.capacity, budget_ms, ceiling, floor
        )

    def check_feasible(self, budget_ms: float) -> float:
        """The predicted latency at minimum widths; raises BudgetInfeasible when over `budget_ms`."""
        return check_feasible(self.grid, self.reported_latency, budget_ms)

    def predicted_ms(self, widths: Sequence[int]) -> float:
        return float(predicted_latency(self.reported_latency, widths)[0])


def plan(
    network: Network,
    predictor: LatencyPredictor,
    budget_ms: float,
    options: PlanOptions | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
    measure: MeasureFn | None = None,
) -> PlanResult:
    """Plan per-group widths (and kept filters, with weights) for a latency budget.

    Args:
        network: the unpruned architecture.
        predictor: a fitted LPNet for the target device.
        budget_ms: the latency the pruned network must meet (ms).
        options: how to plan; defaults pick the mode from whether weights are given.
        weights: IR-keyed state dict (`"<layer>.<tensor>"`, a torchvision state dict as is).
        measure: measures a pruned network in ms; enables the verification loop.

    Raises:
        BudgetInfeasible: the budget is below the predicted latency at minimum widths (with a
            `measure` callable: below the measured latency of the minimum-width network).
        NoPrunableGroups: nothing in the network can be pruned.
        WeightsMismatch: a weight tensor is missing, unknown or mis-shaped.
        InvalidPlanOptions: e.g. the weights mode without weights, the train mode, or an allocation
            band that cannot be (`max_skew` under 1, `min_keep_ratio` outside (0, 1]).
    """
    options = options or PlanOptions()
    policy = options.allocation
    start = time.perf_counter()
    if options.mode is not None:
        mode = PlanMode(options.mode)  # also accepts the mode's string value, e.g. from a JSON request
    else:
        mode = PlanMode.WEIGHTS if weights is not None else PlanMode.ARCHITECTURE_ONLY
    if mode is PlanMode.TRAIN:
        raise InvalidPlanOptions(
            "the train mode needs a dataset: call lpnet.gates.training.train_and_prune with data loaders"
        )
    if mode is PlanMode.WEIGHTS and weights is None:
        raise InvalidPlanOptions("the weights mode needs weights (a safetensors state dict)")
    if budget_ms <= 0:
        raise InvalidPlanOptions(f"budget_ms must be positive, got {budget_ms}")
    if options.verify_timings < 1:
        raise InvalidPlanOptions(f"verify_timings must be at least 1, got {options.verify_timings}")
    if not 0.0 <= options.safety_margin < 1.0:
        raise InvalidPlanOptions(f"safety_margin must be in [0, 1), got {options.safety_margin}")
    torch.manual_seed(options.seed)
    problem = PlanningProblem.build(network, predictor, options.round_to, policy.grid_floor_ratio)
    notes: list[str] = []
    try:
        min_ms = problem.check_feasible(budget_ms)
        first_budget = max(min_ms, budget_ms * (1.0 - options.safety_margin))
    except BudgetInfeasible as infeasible:
        if measure is None:
            raise
        # The predictor's word against the device's: measure the narrowest network before refusing.
        min_ms = infeasible.min_achievable_ms
        measured_min = MeasuredLatency.of(measure(apply_width_vector(network, problem.grid.min_widths))).ms
        if measured_min > budget_ms:
            raise BudgetInfeasible(
                budget_ms, measured_min, infeasible.details.get("unpruned_ms"), True
            ) from None
        first_budget = max(min_ms, budget_ms * (1.0 - options.safety_margin) * min_ms / measured_min)
        notes.append(
            f"the predictor puts the minimum-width network at {min_ms:.3f} ms, over the budget, but it "
            f"measured {measured_min:.3f} ms; planned with internal budgets scaled by their ratio"
        )

    module = module_with_weights(network, weights) if weights is not None else None
    scores: list[torch.Tensor] | None = None
    banded = BandedFit(problem, policy)
    if mode is PlanMode.WEIGHTS:
        assert module is not None
        # The gates keep the band's lower edge open: channels under it never become a plan.
        gate_set = GateSet(module, network, options.gates, min_kept=banded.band(first_budget).low)
        inputs = synthesize_inputs(module, network, options.datafree)
        outcome = optimise_gates_datafree(
            module, gate_set, problem.step_latency, first_budget, inputs, options.datafree
        )
        scores = outcome.scores
        gate_target = outcome.counts

        def solve(internal_ms: float) -> list[int]:
            return banded(gate_target, internal_ms)
    else:

        def solve(internal_ms: float) -> list[int]:
            return banded(optimise_widths(problem, internal_ms, options), internal_ms)

    widths, rounds, met = verification_loop(
        problem,
        budget_ms,
        first_budget,
        min_ms,
        solve,
        measure,
        options.max_rounds,
        options.verify_margin,
        options.accept_band,
        timings=options.verify_timings,
    )
    if scores is None and module is not None:
        scores = group_l1_scores(module, network)
    kept = [top_k_indices(s, k) for s, k in zip(scores, widths, strict=True)] if scores is not None else None
    result = build_result(
        problem,
        mode.value,
        budget_ms,
        options.round_to,
        widths,
        kept,
        rounds,
        met,
        min_ms,
        start,
        scores,
        banded.band(selected_budget(rounds)),
    )
    result.warnings.extend(notes)
    return result


def selected_budget(rounds: Sequence[VerificationRound]) -> float:
    """The internal budget the selected round planned for (its plan's band is the one reported)."""
    return next(r.internal_budget_ms for r in rounds if r.selected)


def optimise_widths(problem: PlanningProblem, budget_ms: float, options: PlanOptions) -> list[float]:
    """Continuous widths maximising the capacity proxy with predicted latency <= budget.

    Widths are `min + (full - min) * sigmoid(theta)`, so every iterate is inside the grid's range.
    """
    full = problem.tn.full_widths  # (G,)
    low = torch.as_tensor(problem.grid.min_widths, dtype=full.dtype)  # (G,)
    span = (full - low).clamp_min(1e-6)
    theta = torch.full_like(full, 3.0, requires_grad=True)  # start near full width
    optimizer = torch.optim.Adam([theta], lr=options.learning_rate)
    constraint = AugmentedLagrangian(budget_ms, rho=options.rho, dual_rate=options.dual_rate)
    for _ in range(options.steps):
        widths = (low + span * torch.sigmoid(theta))[None]  # (1, G)
        lat = problem.latency(widths)[0]
        loss = -problem.capacity.per_layer(widths)[0] + constraint.penalty(lat)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        constraint.update(float(lat.detach()))
    with torch.no_grad():
        result = low + span * torch.sigmoid(theta)  # (G,)
    return [float(v) for v in result]


def calibrated_budget(
    problem: PlanningProblem,
    budget_ms: float,
    min_ms: float,
    measure: MeasureFn,
    margin: float,
    policy: AllocationPolicy | None = None,
) -> tuple[float, str]:
    """The predicted latency to aim a long optimisation at so that its plan *measures* near the aim.

    The train mode's joint allocation learns its counts over epochs of training under the gates,
    and can verify them only afterwards; a verification round that then moves the widths far from
    them prunes channels the network relied on (or restores ones it learnt without). (The planned
    allocation verifies its widths before training instead.) One measurement first: the
    architecture-only plan for the budget (inside the band of `policy`) is measured, and the
    predictor's bias there, measured / predicted, scales the aim (budget * (1 - margin)) into
    predicted milliseconds. Returns that internal budget (never under `min_ms`) and a note.
    """
    banded = BandedFit(problem, policy or AllocationPolicy())
    widths = banded(optimise_widths(problem, budget_ms, PlanOptions()), budget_ms)
    predicted = problem.predicted_ms(widths)
    measured = MeasuredLatency.of(measure(apply_width_vector(problem.network, widths))).ms
    internal = max(min_ms, predicted * budget_ms * (1.0 - margin) / measured)
    note = (
        f"a calibration plan predicted at {predicted:.3f} ms measured {measured:.3f} ms; the gates "
        f"were trained for {internal:.3f} ms predicted"
    )
    return internal, note


def verification_loop(
    problem: PlanningProblem,
    budget_ms: float,
    first_budget_ms: float,
    min_ms: float,
    solve: Callable[[float], list[int]],
    measure: MeasureFn | None,
    max_rounds: int = 3,
    margin: float = 0.04,
    band: float = 0.10,
    min_step: float = 0.05,
    timings: int = 2,
) -> tuple[list[int], list[VerificationRound], bool | None]:
    """Plan, measure, re-plan; returns the selected widths, every round, and whether the budget was met.

    Each round aims the measured latency at `budget * (1 - margin)`: re-timing one network moves it by
    a few percent, so a plan measured exactly at the budget would be over it half the time. A round
    measuring within `band` under the budget (and under the aim) ends the loop. Otherwise the next
    round plans for `predicted * aim / measured`: near a plan, measured latency is roughly a constant
    multiple of the predicted one, so this corrects the predictor's bias there, tightening when it
    was optimistic and loosening when a plan left more than `band` of the budget unused. Because a
    predictor's bias changes from one width vector to the next, each move is at least `min_step` of
    the internal budget, and once one internal budget measured over the aim and another under it,
    the next lies strictly between them (their geometric mean when the correction falls outside).

    A plan whose first timing is at or under the budget could end the loop or be selected, so it is
    timed `timings` times in all and judged on the median. Stopping at the first timing that lands
    under the aim would favour lucky timings (one network's latency moves by a few percent from one
    timing to the next even at the nominal probe speed); a second, independent timing takes most of
    that luck out. Plans timed over the budget are re-planned anyway and timed once.

    The selected round is the slowest one measured at or under the aim, else the slowest at or under
    the budget, else the fastest (and the budget was not met).
    """
    aim = budget_ms * (1.0 - margin)
    rounds: list[VerificationRound] = []
    internal = first_budget_ms
    fits_below: float | None = None  # the largest internal budget whose plan measured at or under the aim
    over_above: float | None = None  # the smallest internal budget whose plan measured over the aim
    total = max(1, max_rounds) if measure is not None else 1
    for index in range(total):
        began = time.perf_counter()
        widths = solve(internal)
        if any(r.widths == widths for r in rounds):
            break  # the same plan again: measuring it twice would not tell anything new
        predicted = problem.predicted_ms(widths)
        series: list[MeasuredLatency] = []
        if measure is not None:
            pruned = apply_width_vector(problem.network, widths)
            series.append(MeasuredLatency.of(measure(pruned)))
            if series[0].ms <= budget_ms:
                series += [MeasuredLatency.of(measure(pruned)) for _ in range(timings - 1)]
        round_ = VerificationRound.timed(
            index + 1, internal, predicted, widths, time.perf_counter() - began, series
        )
        rounds.append(round_)
        measured = round_.measured_ms
        if measured is None:
            break
        logger.info(
            "round %d: internal budget %.3f ms, predicted %.3f ms, measured %.3f ms (budget %.3f ms)",
            index + 1,
            internal,
            predicted,
            measured,
            budget_ms,
        )
        if budget_ms * (1.0 - band) <= measured <= aim:
            break
        if measured > aim and widths == problem.grid.min_widths:
            break
        if measured < aim and widths == problem.grid.full_widths:
            break
        proposal = predicted * aim / measured
        if measured > aim:
            over_above = internal if over_above is None else min(over_above, internal)
            proposal = min(proposal, internal * (1.0 - min_step))
        else:
            fits_below = internal if fits_below is None else max(fits_below, internal)
            proposal = max(proposal, internal * (1.0 + min_step))
        if fits_below is not None and over_above is not None and not fits_below < proposal < over_above:
            proposal = (fits_below * over_above) ** 0.5
        internal = max(min_ms, proposal)
    chosen = _select_round(rounds, budget_ms, aim)
    rounds = [replace(r, selected=i == chosen) for i, r in enumerate(rounds)]
    measured_ms = rounds[chosen].measured_ms
    met = None if measured_ms is None else measured_ms <= budget_ms
    return list(rounds[chosen].widths), rounds, met


def _select_round(rounds: Sequence[VerificationRound], budget_ms: float, aim_ms: float) -> int:
    measured = [(i, r.measured_ms) for i, r in enumerate(rounds) if r.measured_ms is not None]
    if not measured:
        return len(rounds) - 1
    for limit in (aim_ms, budget_ms):
        under = [(ms, i) for i, ms in measured if ms <= limit]
        if under:
            return max(under)[1]
    return min((ms, i) for i, ms in measured)[1]


def build_result(
    problem: PlanningProblem,
    mode: str,
    budget_ms: float,
    round_to: int,
    widths: list[int],
    kept: list[list[int]] | None,
    rounds: list[VerificationRound],
    met: bool | None,
    min_ms: float,
    start: float,
    scores: Sequence[torch.Tensor] | None = None,
    band: AllocationBand | None = None,
) -> PlanResult:
    """Assemble a `PlanResult` for final widths: predictions, costs, per-layer detail, and how uneven
    the widths are against `band` (the band the plan was held to; None: none), warning when they
    leave it."""
    network = problem.network
    pruned = apply_width_vector(network, widths)
    before = problem.predictor.predict(network)
    after = problem.predictor.predict(pruned)
    ms_before = {p.name: p.ms for p in before.per_layer}
    ms_after = {p.name: p.ms for p in after.per_layer}
    layers = []
    for layer in network.layers:
        new = pruned.by_name[layer.name]
        layers.append(
            LayerPlan(
                name=layer.name,
                op=layer.op.value,
                in_channels=layer.in_channels,
                out_channels=layer.out_channels,
                kept_in_channels=new.in_channels,
                kept_out_channels=new.out_channels,
                pruning_ratio=1.0 - new.out_channels / layer.out_channels,
                predicted_ms_before=ms_before[layer.name],
                predicted_ms_after=ms_after[layer.name],
            )
        )
    groups = [
        GroupPlan(
            index=g.index,
            channels=g.channels,
            kept=k,
            pruning_ratio=1.0 - k / g.channels,
            out_layers=list(g.out_layers),
            kept_indices=kept[g.index] if kept is not None else None,
            scores=[float(v) for v in scores[g.index]] if scores is not None else None,
        )
        for g, k in zip(problem.layout.groups, widths, strict=True)
    ]
    warnings = list(after.warnings)
    if met is False:
        best = min(r.measured_ms for r in rounds if r.measured_ms is not None)
        warnings.append(
            f"no plan measured at or under the {budget_ms:.3f} ms budget in {len(rounds)} rounds (best "
            f"{best:.3f} ms); raise max_rounds or refit the predictor with measurements of pruned "
            "variants of this network"
        )
    if widths == problem.grid.full_widths:
        warnings.append(
            "the budget is at or above the unpruned network's predicted latency: nothing is pruned"
        )
    if band is not None:
        warnings.extend(band.warnings(widths))
    with torch.no_grad():
        capacity = float(problem.capacity(torch.as_tensor([widths], dtype=torch.float32))[0])
    return PlanResult(
        mode=mode,
        network_name=network.name,
        network_hash=network.content_hash,
        budget_ms=budget_ms,
        round_to=round_to,
        widths=list(widths),
        groups=groups,
        layers=layers,
        predicted=LatencyEstimate.of(after),
        unpruned_predicted=LatencyEstimate.of(before),
        min_achievable_ms=min_ms,
        cost_before=CostSummary.of(network_cost(network)),
        cost_after=CostSummary.of(network_cost(pruned)),
        rounds=rounds,
        met_budget=met,
        capacity=capacity,
        plan_seconds=time.perf_counter() - start,
        pruned_network=pruned,
        warnings=warnings,
        allocation=band.summary(widths) if band is not None else unbanded_summary(problem.grid, widths),
    )
