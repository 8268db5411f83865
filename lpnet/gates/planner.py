"""Plan per-group widths that meet a latency budget, optionally verified by measurement.

Modes:

- `architecture-only`: no weights. Optimises continuous per-group widths through LPNet to maximise
  the capacity proxy (`lpnet.gates.capacity`) under the latency constraint (augmented Lagrangian),
  then rounds them onto the staircase (`lpnet.gates.budget`). Takes a second or two, resnet50
  included.
- `weights`: a state dict is given. W-Gates score every filter from its weights and are trained,
  weights frozen, to keep the network's outputs on BatchNorm-synthesised inputs
  (`lpnet.gates.datafree`) under the budget; their kept counts are the widths. The plan adds which
  filters stay (`filters`): by default the largest by L1 norm, or the highest W-Gate scores
  (docs/planner.md says why the norms are the default).
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

import torch
from torch import nn

from lpnet.arch.counting import network_cost
from lpnet.arch.groups import apply_width_vector
from lpnet.arch.ir import Network
from lpnet.errors import BudgetInfeasible, InvalidPlanOptions
from lpnet.gates.allocation import AllocationBand, AllocationPolicy, BandedFit, unbanded_summary
from lpnet.gates.budget import AugmentedLagrangian
from lpnet.gates.datafree import DataFreeConfig, optimise_gates_datafree, synthesize_inputs
from lpnet.gates.options import (
    ACCEPT_BAND,
    FILTERS,
    MAX_ROUNDS,
    MAX_SKEW,
    MIN_KEEP_RATIO,
    ROUND_TO,
    SAFETY_MARGIN,
    SEED,
    VERIFY_MARGIN,
    VERIFY_TIMINGS,
    FilterChoice,
    PlanMode,
    check_options,
)
from lpnet.gates.problem import PlanningProblem
from lpnet.gates.result import (
    CostSummary,
    GroupPlan,
    LatencyEstimate,
    LayerPlan,
    PlanResult,
    VerificationRound,
)
from lpnet.gates.wgates import GateSet, WGateConfig
from lpnet.measurement import MeasuredLatency, MeasureFn
from lpnet.predictor.predict import LatencyPredictor, Prediction
from lpnet.pruning import group_l1_scores, module_with_weights, top_k_indices

logger = logging.getLogger(__name__)


WidthSolver = Callable[[float], list[int]]
"""Grid widths for an internal budget (ms): one verification round's plan."""


@dataclass(frozen=True)
class SharedPlanOptions:
    """The options every mode shares: the width grid, the allocation band, verification and the seed.

    Each field is declared from its spec in `lpnet.gates.options`, which says what it does and
    bounds it: `round_to`, `max_skew` and `min_keep_ratio` (the grid and the allocation band),
    `max_rounds`, `verify_margin`, `verify_timings` and `accept_band` (verification, when a `measure`
    callable is given; see `verification_loop`), and `seed`.
    """

    round_to: int = ROUND_TO.field()
    max_skew: float | None = MAX_SKEW.field()
    min_keep_ratio: float = MIN_KEEP_RATIO.field()
    max_rounds: int = MAX_ROUNDS.field()
    verify_margin: float = VERIFY_MARGIN.field()
    verify_timings: int = VERIFY_TIMINGS.field()
    accept_band: float = ACCEPT_BAND.field()
    seed: int = SEED.field()

    @property
    def band_policy(self) -> AllocationPolicy:
        """The allocation band's policy (raises InvalidPlanOptions for a skew under 1 or a minimum
        outside (0, 1])."""
        return AllocationPolicy(self.max_skew, self.min_keep_ratio)

    def check(self) -> None:
        """Raises InvalidPlanOptions naming the first field outside its spec's bounds."""
        check_options(self)


@dataclass(frozen=True)
class PlanOptions(SharedPlanOptions):
    """How to plan: the options every mode shares (`SharedPlanOptions`), and the planner's own.

    Attributes:
        mode: None picks `weights` when weights are given, else `architecture-only`.
        safety_margin: plan for budget * (1 - margin) from the first round (`SAFETY_MARGIN`).
        steps: optimisation steps of the architecture-only mode.
        learning_rate: its Adam learning rate (on the logits of the keep ratios).
        rho: augmented-Lagrangian penalty weight.
        dual_rate: multiplier step per optimisation step, per unit of relative violation.
        gates: W-Gate network settings (weights mode).
        datafree: synthesis and gate-training settings (weights mode).
        filters: which filters a weights-mode plan keeps (`FILTERS`).
    """

    mode: PlanMode | None = None
    safety_margin: float = SAFETY_MARGIN.field()
    steps: int = 300
    learning_rate: float = 0.1
    rho: float = 20.0
    dual_rate: float = 1.0
    gates: WGateConfig = field(default_factory=WGateConfig)
    datafree: DataFreeConfig = field(default_factory=DataFreeConfig)
    filters: FilterChoice = FILTERS.field()


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
        InvalidPlanOptions: e.g. the weights mode without weights, the train mode, or an option
            outside its bounds (`max_skew` under 1, `min_keep_ratio` outside (0, 1], ...).
    """
    options = options or PlanOptions()
    start = time.perf_counter()
    mode = plan_mode(options, weights is not None, budget_ms)
    policy = options.band_policy
    torch.manual_seed(options.seed)
    problem = PlanningProblem.build(network, predictor, options.round_to, policy.grid_floor_ratio)
    min_ms, first_budget, notes = starting_budget(problem, budget_ms, options.safety_margin, measure)
    module = module_with_weights(network, weights) if weights is not None else None
    banded = BandedFit(problem, policy)
    solve, scores = width_solver(mode, problem, banded, module, options, first_budget)
    verified = verification_loop(problem, budget_ms, first_budget, min_ms, solve, measure, options)
    if scores is None and module is not None:
        scores = group_l1_scores(module, network)
    kept = (
        None
        if scores is None
        else [top_k_indices(s, k) for s, k in zip(scores, verified.widths, strict=True)]
    )
    band = banded.band(verified.internal_budget_ms)
    result = build_result(
        problem, mode.value, budget_ms, options.round_to, verified, kept, min_ms, start, scores, band
    )
    result.warnings.extend(notes)
    return result


def plan_mode(options: PlanOptions, has_weights: bool, budget_ms: float) -> PlanMode:
    """The mode `plan` runs, once the options and the budget are checked.

    Raises:
        InvalidPlanOptions: an option outside its bounds, an unknown mode, the train mode, the
            weights mode without weights, or a budget that is not positive.
    """
    options.check()
    if options.mode is not None:
        mode = PlanMode.named(options.mode)  # also the mode's name as a string, e.g. from a JSON request
    else:
        mode = PlanMode.WEIGHTS if has_weights else PlanMode.ARCHITECTURE_ONLY
    if mode is PlanMode.TRAIN:
        raise InvalidPlanOptions(
            "the train mode needs a dataset: call lpnet.gates.training.train_and_prune with data loaders"
        )
    if mode is PlanMode.WEIGHTS and not has_weights:
        raise InvalidPlanOptions("the weights mode needs weights (a safetensors state dict)")
    if budget_ms <= 0:
        raise InvalidPlanOptions(f"budget_ms must be positive, got {budget_ms}")
    return mode


def starting_budget(
    problem: PlanningProblem, budget_ms: float, safety_margin: float, measure: MeasureFn | None
) -> tuple[float, float, list[str]]:
    """The predicted latency at minimum widths, the first round's internal budget, and notes for the plan.

    A budget under the predicted latency at minimum widths is refused unless the narrowest network,
    measured, meets it: then the predictor's word gives way to the device's, and internal budgets are
    scaled by their ratio.

    Raises:
        BudgetInfeasible: the budget is below the minimum-width latency (measured, with `measure`).
    """
    try:
        min_ms = problem.check_feasible(budget_ms)
    except BudgetInfeasible as infeasible:
        if measure is None:
            raise
        min_ms = infeasible.min_achievable_ms
        narrowest = apply_width_vector(problem.network, problem.grid.min_widths)
        measured_min = MeasuredLatency.of(measure(narrowest)).ms
        if measured_min > budget_ms:
            raise BudgetInfeasible(
                budget_ms, measured_min, infeasible.details.get("unpruned_ms"), True
            ) from None
        note = (
            f"the predictor puts the minimum-width network at {min_ms:.3f} ms, over the budget, but it "
            f"measured {measured_min:.3f} ms; planned with internal budgets scaled by their ratio"
        )
        return min_ms, max(min_ms, budget_ms * (1.0 - safety_margin) * min_ms / measured_min), [note]
    return min_ms, max(min_ms, budget_ms * (1.0 - safety_margin)), []


def width_solver(
    mode: PlanMode,
    problem: PlanningProblem,
    banded: BandedFit,
    module: nn.Module | None,
    options: PlanOptions,
    first_budget_ms: float,
) -> tuple[WidthSolver, list[torch.Tensor] | None]:
    """How each verification round plans its widths, and the weights mode's W-Gate filter scores when
    its filters are the gates' (None: the largest by L1 norm).

    The weights mode trains its gates once, for the first internal budget; every round then fits their
    counts into the band at its own budget. The architecture-only mode optimises afresh each round.
    """
    if mode is PlanMode.WEIGHTS:
        assert module is not None
        # The gates keep the band's lower edge open: channels under it never become a plan.
        gate_set = GateSet(module, problem.network, options.gates, min_kept=banded.band(first_budget_ms).low)
        inputs = synthesize_inputs(module, problem.network, options.datafree)
        outcome = optimise_gates_datafree(
            module, gate_set, problem.step_latency, first_budget_ms, inputs, options.datafree
        )
        gate_target = outcome.counts

        def fit_gates(internal_ms: float) -> list[int]:
            return banded(gate_target, internal_ms)

        return fit_gates, outcome.scores if options.filters == FilterChoice.GATES else None

    def optimise(internal_ms: float) -> list[int]:
        return banded(optimise_widths(problem, internal_ms, options), internal_ms)

    return optimise, None


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


@dataclass(frozen=True)
class Verification:
    """What verification settles on.

    Attributes:
        widths: the selected round's widths.
        rounds: every round, the selected one marked.
        met: whether the selected round measured at or under the budget (None: nothing was measured).
    """

    widths: list[int]
    rounds: list[VerificationRound]
    met: bool | None

    @property
    def internal_budget_ms(self) -> float:
        """The internal budget the selected round planned for (its plan's band is the one reported)."""
        return next(r.internal_budget_ms for r in self.rounds if r.selected)


def verification_loop(
    problem: PlanningProblem,
    budget_ms: float,
    first_budget_ms: float,
    min_ms: float,
    solve: WidthSolver,
    measure: MeasureFn | None,
    options: SharedPlanOptions,
    min_step: float = 0.05,
) -> Verification:
    """Plan, measure, re-plan for at most `options.max_rounds` rounds (one round without `measure`).

    Each round aims the measured latency at `budget * (1 - verify_margin)`: re-timing one network
    moves it by a few percent, so a plan measured exactly at the budget would be over it half the
    time. A round measuring within `accept_band` under the budget (and under the aim) ends the loop.
    Otherwise the next round plans for an internal budget corrected by the measurement
    (`InternalBudgets`).

    A plan whose first timing is at or under the budget could end the loop or be selected, so it is
    timed `verify_timings` times in all and judged on the median. Stopping at the first timing that lands
    under the aim would favour lucky timings (one network's latency moves by a few percent from one
    timing to the next even at the nominal probe speed); a second, independent timing takes most of
    that luck out. Plans timed over the budget are re-planned anyway and timed once.

    The selected round is the slowest one measured at or under the aim, else the slowest at or under
    the budget, else the fastest (and the budget was not met).
    """
    aim = budget_ms * (1.0 - options.verify_margin)
    rounds: list[VerificationRound] = []
    internal = first_budget_ms
    budgets = InternalBudgets(aim, min_step)
    total = max(1, options.max_rounds) if measure is not None else 1
    for index in range(total):
        began = time.perf_counter()
        widths = solve(internal)
        if any(r.widths == widths for r in rounds):
            break  # the same plan again: measuring it twice would not tell anything new
        predicted = problem.predicted_ms(widths)
        series = time_plan(problem, widths, measure, budget_ms, options.verify_timings)
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
        accepted = budget_ms * (1.0 - options.accept_band) <= measured <= aim
        if accepted or _cannot_move(problem, widths, measured, aim):
            break
        internal = max(min_ms, budgets.next(internal, predicted, measured))
    chosen = _select_round(rounds, budget_ms, aim)
    rounds = [replace(r, selected=i == chosen) for i, r in enumerate(rounds)]
    measured_ms = rounds[chosen].measured_ms
    met = None if measured_ms is None else measured_ms <= budget_ms
    return Verification(list(rounds[chosen].widths), rounds, met)


def _cannot_move(problem: PlanningProblem, widths: list[int], measured_ms: float, aim_ms: float) -> bool:
    """Whether a plan measured over the aim at minimum widths, or under it at full widths."""
    if measured_ms > aim_ms:
        return widths == problem.grid.min_widths
    if measured_ms < aim_ms:
        return widths == problem.grid.full_widths
    return False


def time_plan(
    problem: PlanningProblem, widths: list[int], measure: MeasureFn | None, budget_ms: float, timings: int
) -> list[MeasuredLatency]:
    """The timings of a plan: none without `measure`, one when over the budget, else `timings`."""
    if measure is None:
        return []
    pruned = apply_width_vector(problem.network, widths)
    series = [MeasuredLatency.of(measure(pruned))]
    if series[0].ms <= budget_ms:
        series += [MeasuredLatency.of(measure(pruned)) for _ in range(timings - 1)]
    return series


@dataclass
class InternalBudgets:
    """The internal budgets verification plans for, each corrected by what the last one measured.

    Near a plan, measured latency is roughly a constant multiple of the predicted one, so the next
    round plans for `predicted * aim / measured`: this corrects the predictor's bias there,
    tightening when it was optimistic and loosening when a plan left budget unused. Because a
    predictor's bias changes from one width vector to the next, each move is at least `min_step` of
    the internal budget, and once one internal budget measured over the aim and another under it,
    the next lies strictly between them (their geometric mean when the correction falls outside).
    """

    aim_ms: float
    min_step: float
    fits_below: float | None = None  # the largest internal budget whose plan measured at or under the aim
    over_above: float | None = None  # the smallest internal budget whose plan measured over the aim

    def next(self, internal_ms: float, predicted_ms: float, measured_ms: float) -> float:
        """The internal budget after one planned for `internal_ms` measured `measured_ms`."""
        proposal = predicted_ms * self.aim_ms / measured_ms
        if measured_ms > self.aim_ms:
            self.over_above = internal_ms if self.over_above is None else min(self.over_above, internal_ms)
            proposal = min(proposal, internal_ms * (1.0 - self.min_step))
        else:
            self.fits_below = internal_ms if self.fits_below is None else max(self.fits_below, internal_ms)
            proposal = max(proposal, internal_ms * (1.0 + self.min_step))
        low, high = self.fits_below, self.over_above
        if low is not None and high is not None and not low < proposal < high:
            proposal = (low * high) ** 0.5
        return proposal


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
    verified: Verification,
    kept: list[list[int]] | None,
    min_ms: float,
    start: float,
    scores: Sequence[torch.Tensor] | None = None,
    band: AllocationBand | None = None,
) -> PlanResult:
    """Assemble a `PlanResult` for the verified widths: predictions, costs, per-layer detail, and how
    uneven the widths are against `band` (the band the plan was held to; None: none), warning when
    they leave it."""
    network = problem.network
    widths, rounds, met = verified.widths, verified.rounds, verified.met
    pruned = apply_width_vector(network, widths)
    before = problem.predictor.predict(network)
    after = problem.predictor.predict(pruned)
    warnings = list(after.warnings) + plan_warnings(problem, budget_ms, widths, rounds, met)
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
        groups=group_plans(problem, widths, kept, scores),
        layers=layer_plans(network, pruned, before, after),
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


def layer_plans(network: Network, pruned: Network, before: Prediction, after: Prediction) -> list[LayerPlan]:
    """Every layer's channels and predicted latency before and after pruning."""
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
    return layers


def group_plans(
    problem: PlanningProblem,
    widths: list[int],
    kept: list[list[int]] | None,
    scores: Sequence[torch.Tensor] | None,
) -> list[GroupPlan]:
    """Every group's kept count, and with weights which filters stay and their scores."""
    return [
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


def plan_warnings(
    problem: PlanningProblem,
    budget_ms: float,
    widths: list[int],
    rounds: list[VerificationRound],
    met: bool | None,
) -> list[str]:
    """What a plan must warn about besides the predictor and the band: a missed budget, no pruning."""
    warnings = []
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
    return warnings
