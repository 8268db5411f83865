"""The train mode: W-Gates trained jointly with the network on data, then physical pruning and fine-tuning.

With the planned allocation (the default):

1. Widths: the architecture-only plan under the budget, kept within the allocation band around the
   uniform keep ratio (`lpnet.gates.allocation`, as in every mode), and verified by measurement
   when a `measure` callable is given. A network's latency does not depend on its weights, so the
   widths are settled before any training, and the gates train for exactly the widths that are
   pruned.
2. Joint training: the network's weights (SGD, the task loss) and the W-Gates (Adam) are trained
   together, the gates reading the current weights at every step; each group's open gates shrink
   from all of its channels to its planned width, the highest-scoring filters staying open.
3. Physical pruning through torch-pruning (the highest-scoring filters stay), then fine-tuning.

With the joint allocation, the counts too are learnt in step 2 under the augmented-Lagrangian
latency term and the capacity proxy's log barrier (the target calibrated first by measuring one
plan, `calibrated_budget`), and are then rounded onto the grid and verified after training.

One cosine learning-rate schedule spans steps 2 and 3, so the network is still learning when the
gates settle and fine-tuning carries on from there.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from lpnet.arch.groups import apply_width_vector
from lpnet.arch.ir import Network
from lpnet.gates.allocation import BandedFit
from lpnet.gates.budget import AugmentedLagrangian, warmup_budget
from lpnet.gates.options import (
    ALLOCATION,
    FINETUNE_EPOCHS,
    GATE_EPOCHS,
    MAX_BATCHES,
    TRAIN_LEARNING_RATE,
    Allocation,
    PlanMode,
)
from lpnet.gates.planner import (
    PlanOptions,
    SharedPlanOptions,
    Verification,
    build_result,
    optimise_widths,
    verification_loop,
)
from lpnet.gates.problem import PlanningProblem
from lpnet.gates.result import PlanResult
from lpnet.gates.supervised import (
    Batches,
    CosineSpan,
    epoch_length,
    evaluate_accuracy,
    recalibrate_batch_norm,
    train_epochs,
)
from lpnet.gates.wgates import GateSet, WGateConfig
from lpnet.measurement import MeasuredLatency, MeasureFn
from lpnet.predictor.predict import LatencyPredictor
from lpnet.pruning import PrunedModel, prune_module, top_k_indices

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPruneConfig(SharedPlanOptions):
    """Settings of the train mode: the options every mode shares (`SharedPlanOptions`), and these.

    Attributes:
        allocation: how the kept count of each group is decided (`ALLOCATION`).
            `planned` (default): by the architecture-only optimisation, gradient descent through
            LPNet maximising the capacity proxy under the budget inside the allocation band
            (verified by measurement, when measuring, before any training); during joint training
            each group's open gates shrink from all to that count over `budget_warmup`, the
            highest-scoring filters stay open, and the task loss trains the gate MLPs (through
            `top_k_gates`) to score which filters earn their place.
            `joint`: the counts too are learnt in joint training, each gate open where its score is
            positive, under LPNet's augmented-Lagrangian latency term and the capacity barrier. The
            counts are the gates' own: the plan reports how uneven they are but does not hold them
            to the allocation band.
        gate_epochs: epochs of joint training of weights and gates (`GATE_EPOCHS`).
        finetune_epochs: epochs of fine-tuning after physical pruning (`FINETUNE_EPOCHS`).
        learning_rate: SGD (momentum 0.9) learning rate of the weights, cosine-decayed over joint
            training and fine-tuning as one schedule (`CosineSpan`, `TRAIN_LEARNING_RATE`).
        weight_decay: SGD weight decay.
        gate_learning_rate: Adam learning rate of the gates.
        rho: augmented-Lagrangian penalty weight.
        dual_rate: multiplier step per optimisation step, per unit of relative violation.
        capacity_weight: weight of the capacity proxy (`lpnet.gates.capacity`, per layer) in the
            joint loss. A few epochs of task loss cannot tell the gates what a bottleneck will
            cost once the network has been fine-tuned; the proxy's log barrier can (halving a group
            at 16 channels costs as much as at 256), so the latency term takes channels where they
            are cheap rather than shutting one early group down to its minimum. 0 disables it.
        budget_warmup: share of the joint-training steps over which the constraint's budget moves
            from the unpruned predicted latency down to `budget_ms` (see `warmup_budget`).
        noise_anneal: share of the joint-training steps over which the gates' logistic noise decays
            to zero (0 keeps it constant); the rest of the training sees the final, deterministic gates.
        max_batches: cap on batches per epoch (quick runs); None uses every batch (`MAX_BATCHES`).
        gates: gate network settings; the task loss has a gradient everywhere, so the gates need less
            exploration noise than in the data-free mode (strong noise acts like dropout and the
            network learns to shut noisy channels for good), and they start from the magnitude
            prior (`WGateConfig.magnitude_prior`) rather than a random ranking of the filters.
    """

    allocation: Allocation = ALLOCATION.field()
    gate_epochs: int = GATE_EPOCHS.field()
    finetune_epochs: int = FINETUNE_EPOCHS.field()
    learning_rate: float = TRAIN_LEARNING_RATE.field()
    weight_decay: float = 5e-4
    gate_learning_rate: float = 0.002
    rho: float = 20.0
    dual_rate: float = 0.1
    capacity_weight: float = 0.5
    budget_warmup: float = 0.5
    noise_anneal: float = 0.8
    max_batches: int | None = MAX_BATCHES.field()
    gates: WGateConfig = field(default_factory=lambda: WGateConfig(noise=0.3, magnitude_prior=1.0))

    def checked_allocation(self) -> Allocation:
        """The allocation, once every option is checked.

        Raises:
            ValueError: an unknown allocation.
            InvalidPlanOptions: an option outside its bounds (`max_skew` under 1, ...).
        """
        try:
            allocation = Allocation(self.allocation)
        except ValueError:
            names = sorted(a.value for a in Allocation)
            raise ValueError(f"allocation must be one of {names}, got {self.allocation!r}") from None
        self.check()
        return allocation


@dataclass
class TrainedPlan:
    """The outcome of the train mode.

    Attributes:
        plan: the plan (mode "train"), kept indices included.
        pruned: the pruned, fine-tuned module and its IR.
        accuracy_before: validation accuracy of the module as given.
        accuracy_gated: after joint training, with the deterministic gates applied.
        accuracy_pruned: right after physical pruning (BatchNorm statistics recomputed), before
            fine-tuning.
        accuracy_after: after fine-tuning.
        gated_counts: per group, the gates open at the end of joint training (deterministic). With
            the planned allocation these are the pruned widths; with the joint allocation, rounding
            and verification may move the widths from them.
        seconds: wall time of the whole run.
    """

    plan: PlanResult
    pruned: PrunedModel
    accuracy_before: float
    accuracy_gated: float
    accuracy_pruned: float
    accuracy_after: float
    gated_counts: list[int]
    seconds: float


def planned_widths(banded: BandedFit, budget_ms: float, seed: int = 0) -> list[int]:
    """The planned allocation's widths for a budget: the architecture-only plan inside the band."""
    return banded(optimise_widths(banded.problem, budget_ms, PlanOptions(seed=seed)), budget_ms)


def calibrated_budget(
    banded: BandedFit, budget_ms: float, min_ms: float, measure: MeasureFn, margin: float
) -> tuple[float, str]:
    """The predicted latency to aim a long optimisation at so that its plan *measures* near the aim.

    The train mode's joint allocation learns its counts over epochs of training under the gates,
    and can verify them only afterwards; a verification round that then moves the widths far from
    them prunes channels the network relied on (or restores ones it learnt without). (The planned
    allocation verifies its widths before training instead.) One measurement first: the
    architecture-only plan for the budget (inside the band of `banded`) is measured, and the
    predictor's bias there, measured / predicted, scales the aim (budget * (1 - margin)) into
    predicted milliseconds. Returns that internal budget (never under `min_ms`) and a note.
    """
    problem = banded.problem
    widths = banded(optimise_widths(problem, budget_ms, PlanOptions()), budget_ms)
    predicted = problem.predicted_ms(widths)
    measured = MeasuredLatency.of(measure(apply_width_vector(problem.network, widths))).ms
    internal = max(min_ms, predicted * budget_ms * (1.0 - margin) / measured)
    note = (
        f"a calibration plan predicted at {predicted:.3f} ms measured {measured:.3f} ms; the gates "
        f"were trained for {internal:.3f} ms predicted"
    )
    return internal, note


def train_and_prune(
    module: nn.Module,
    network: Network,
    predictor: LatencyPredictor,
    budget_ms: float,
    train_batches: Batches,
    val_batches: Batches,
    config: TrainPruneConfig | None = None,
    measure: MeasureFn | None = None,
) -> TrainedPlan:
    """Train W-Gates with the network, prune it to the latency budget, fine-tune it.

    Args:
        module: the network to prune (left untouched; a copy is trained).
        network: its IR.
        predictor: LPNet for the target device.
        budget_ms: latency budget (ms).
        train_batches, val_batches: (inputs, targets) batches, e.g. DataLoaders.
        config: training settings.
        measure: measures a pruned network (ms); enables the verification loop.

    Raises:
        BudgetInfeasible: the budget is below the predicted latency at minimum widths.
        NoPrunableGroups: nothing to prune.
        ValueError: an unknown allocation.
        InvalidPlanOptions: an option outside its bounds (`max_skew` under 1, `min_keep_ratio`
            outside (0, 1], ...).
    """
    config = config or TrainPruneConfig()
    planned = config.checked_allocation() is Allocation.PLANNED
    policy = config.band_policy
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    problem = PlanningProblem.build(network, predictor, config.round_to, policy.grid_floor_ratio)
    banded = BandedFit(problem, policy)
    min_ms = problem.check_feasible(budget_ms)
    accuracy_before = evaluate_accuracy(module, val_batches)
    gate_budget, notes = budget_ms, []
    if planned:
        verified = verified_plan(problem, banded, budget_ms, min_ms, measure, config)
    elif measure is not None:
        gate_budget, note = calibrated_budget(banded, budget_ms, min_ms, measure, config.verify_margin)
        notes.append(note)
    model = copy.deepcopy(module)
    planned_counts = verified.widths if planned else None
    gated = train_gates(model, problem, config, planned_counts, gate_budget, train_batches, val_batches)
    if not planned:
        fit_gated = partial(problem.fit, gated.expected)
        verified = verification_loop(problem, budget_ms, gate_budget, min_ms, fit_gated, measure, config)
    kept = [top_k_indices(s, k) for s, k in zip(gated.scores, verified.widths, strict=True)]
    pruned = prune_module(model, network, verified.widths, kept)
    accuracy_pruned, accuracy_after = finetune(pruned, config, train_batches, val_batches)
    # The joint allocation's counts are the gates' own: they are reported, not held to the band.
    band = banded.band(verified.internal_budget_ms) if planned else None
    result = build_result(
        problem,
        PlanMode.TRAIN.value,
        budget_ms,
        config.round_to,
        verified,
        kept,
        min_ms,
        start,
        gated.scores,
        band,
    )
    result.warnings.extend(notes)
    return TrainedPlan(
        plan=result,
        pruned=pruned,
        accuracy_before=accuracy_before,
        accuracy_gated=gated.accuracy,
        accuracy_pruned=accuracy_pruned,
        accuracy_after=accuracy_after,
        gated_counts=gated.counts,
        seconds=time.perf_counter() - start,
    )


def verified_plan(
    problem: PlanningProblem,
    banded: BandedFit,
    budget_ms: float,
    min_ms: float,
    measure: MeasureFn | None,
    config: TrainPruneConfig,
) -> Verification:
    """The planned allocation's widths, verified before any training: re-planning after it would
    prune channels the network learnt to rely on, or restore ones it learnt without."""
    first_ms = budget_ms if measure is None else max(min_ms, budget_ms * (1.0 - config.verify_margin))

    def plan_widths(internal_ms: float) -> list[int]:
        return planned_widths(banded, internal_ms, config.seed)

    return verification_loop(problem, budget_ms, first_ms, min_ms, plan_widths, measure, config)


@dataclass
class GatedTraining:
    """What joint training ends with.

    Attributes:
        scores: per group, each filter's final gate score (C_g,); the highest-scoring filters stay.
        counts: per group, the gates open at the end (deterministic).
        expected: per group, the count the noisy training-mode gates keep on average
            (`GateSet.expected_counts`): the joint allocation's target.
        accuracy: validation accuracy with the deterministic gates applied.
    """

    scores: list[torch.Tensor]
    counts: list[int]
    expected: list[float]
    accuracy: float


def train_gates(
    model: nn.Module,
    problem: PlanningProblem,
    config: TrainPruneConfig,
    planned_counts: list[int] | None,
    gate_budget_ms: float,
    train_batches: Batches,
    val_batches: Batches,
) -> GatedTraining:
    """Joint training of `model` (in place) and its W-Gates, for `planned_counts` or, when None, for
    counts the gates learn under `gate_budget_ms` (predicted); see `GateSchedule`."""
    gate_set = GateSet(
        model, problem.network, config.gates, track_weights=True, min_kept=problem.grid.min_widths
    )
    per_epoch = config.max_batches if config.max_batches is not None else epoch_length(train_batches)
    steps = config.gate_epochs * max(per_epoch, 1)
    schedule = GateSchedule.start(problem, gate_set, config, planned_counts, gate_budget_ms, steps)
    gate_optimizer = torch.optim.Adam(gate_set.parameters(), lr=config.gate_learning_rate)
    gate_set.train()
    with gate_set.attached(model):
        losses = train_epochs(
            model,
            train_batches,
            config.gate_epochs,
            config.learning_rate,
            config.weight_decay,
            config.max_batches,
            extra_loss=None if planned_counts is not None else schedule.latency_term,
            extra_optimizer=gate_optimizer,
            after_step=schedule.after_step,
            schedule=CosineSpan(0, config.gate_epochs + config.finetune_epochs),
        )
        gate_set.eval()
        recalibrate_batch_norm(model, train_batches, config.max_batches or 20)
        accuracy = evaluate_accuracy(model, val_batches)
        with torch.no_grad():
            counts = [int(g.sum()) for g in gate_set.compute()]
    logger.info(
        "joint training: losses %s, last predicted %.3f ms (budget %.3f ms), gated accuracy %.4f",
        [round(v, 4) for v in losses],
        schedule.last_latency[-1] if schedule.last_latency else float("nan"),
        gate_budget_ms,
        accuracy,
    )
    with torch.no_grad():
        scores = [s.detach() for s in gate_set.scores()]
    return GatedTraining(scores, counts, gate_set.expected_counts(scores), accuracy)


@dataclass
class GateSchedule:
    """What joint training does around each of its steps, for either allocation.

    Planned counts: each group's open gates shrink from all of its channels to its planned count over
    the budget warm-up. Learnt counts: the latency term joins the task loss (`latency_term`), and
    after each step the multiplier takes a dual step while the constraint's budget moves from the
    unpruned predicted latency down to the gates' budget over the warm-up. Either way the gates'
    noise decays to zero over the first `noise_anneal` of the steps, so the network finishes
    training under the gates it keeps.
    """

    problem: PlanningProblem
    gate_set: GateSet
    config: TrainPruneConfig
    planned_counts: list[int] | None
    constraint: AugmentedLagrangian
    budget_ms: float
    start_ms: float
    warmup_steps: float
    anneal_steps: float
    last_latency: list[float] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        problem: PlanningProblem,
        gate_set: GateSet,
        config: TrainPruneConfig,
        planned_counts: list[int] | None,
        budget_ms: float,
        steps: int,
    ) -> GateSchedule:
        """The schedule of `steps` joint-training steps, with every gate open for planned counts."""
        if planned_counts is not None:
            gate_set.set_counts(problem.grid.full_widths)
        constraint = AugmentedLagrangian(budget_ms, rho=config.rho, dual_rate=config.dual_rate, equality=True)
        with torch.no_grad():
            start_ms = float(problem.latency(problem.tn.full_widths[None])[0])
        warmup_steps = config.budget_warmup * steps
        constraint.budget_ms = warmup_budget(start_ms, budget_ms, 0.0 if warmup_steps > 0 else 1.0)
        return cls(
            problem,
            gate_set,
            config,
            planned_counts,
            constraint,
            budget_ms,
            start_ms,
            warmup_steps,
            config.noise_anneal * steps,
        )

    def latency_term(self) -> torch.Tensor:
        """The learnt counts' loss term: the latency constraint on the gated counts, less the
        weighted capacity proxy."""
        # Counts below the grid's minimum never become a plan; clamping keeps LPNet inside its domain.
        floor = torch.as_tensor(self.problem.grid.min_widths, dtype=torch.float32)  # (G,)
        counts = torch.maximum(self.gate_set.kept_counts(), floor)[None]  # (1, G)
        lat = self.problem.step_latency(counts)[0]
        self.last_latency.append(float(lat.detach()))
        term = self.constraint.penalty(lat)
        if self.config.capacity_weight > 0:
            term = term - self.config.capacity_weight * self.problem.capacity.per_layer(counts)[0]
        return term

    def after_step(self, step: int) -> None:
        """Move the counts (planned) or the multiplier and the budget (learnt), then decay the noise."""
        if self.planned_counts is not None:
            self._shrink_counts(step, self.planned_counts)
        else:
            self._dual_step(step)
        if self.anneal_steps > 0:
            self.gate_set.noise_scale = self.config.gates.noise * max(
                0.0, 1.0 - (step + 1) / self.anneal_steps
            )

    def _shrink_counts(self, step: int, planned: list[int]) -> None:
        done = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        full = self.problem.grid.full_widths
        self.gate_set.set_counts([round(f - (f - p) * done) for f, p in zip(full, planned, strict=True)])

    def _dual_step(self, step: int) -> None:
        if self.last_latency:
            self.constraint.update(self.last_latency[-1])
        if self.warmup_steps > 0:
            self.constraint.budget_ms = warmup_budget(
                self.start_ms, self.budget_ms, (step + 1) / self.warmup_steps
            )
        if step % 20 == 0 and self.last_latency:
            logger.debug(
                "step %d: predicted %.3f ms (budget now %.3f ms), multiplier %.3f",
                step,
                self.last_latency[-1],
                self.constraint.budget_ms,
                self.constraint.multiplier,
            )


def finetune(
    pruned: PrunedModel, config: TrainPruneConfig, train_batches: Batches, val_batches: Batches
) -> tuple[float, float]:
    """Fine-tune a pruned module (in place) for the rest of the cosine schedule; returns its accuracy
    right after pruning (BatchNorm statistics recomputed) and after fine-tuning."""
    recalibrate_batch_norm(pruned.module, train_batches, config.max_batches or 20)
    accuracy_pruned = evaluate_accuracy(pruned.module, val_batches)
    if config.finetune_epochs > 0:
        train_epochs(
            pruned.module,
            train_batches,
            config.finetune_epochs,
            config.learning_rate,
            config.weight_decay,
            config.max_batches,
            schedule=CosineSpan(config.gate_epochs, config.gate_epochs + config.finetune_epochs),
        )
    return accuracy_pruned, evaluate_accuracy(pruned.module, val_batches)
