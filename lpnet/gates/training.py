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

One cosine learning-rate schedule spans steps 1 and 3, so the network is still learning when the
gates settle and fine-tuning carries on from there.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lpnet.arch.ir import Network
from lpnet.gates.allocation import DEFAULT_MAX_SKEW, DEFAULT_MIN_KEEP_RATIO, AllocationPolicy, BandedFit
from lpnet.gates.budget import AugmentedLagrangian, warmup_budget
from lpnet.gates.planner import (
    MeasureFn,
    PlanMode,
    PlanningProblem,
    PlanOptions,
    build_result,
    calibrated_budget,
    optimise_widths,
    selected_budget,
    verification_loop,
)
from lpnet.gates.result import PlanResult, VerificationRound
from lpnet.gates.wgates import GateSet, WGateConfig
from lpnet.predictor.predict import LatencyPredictor
from lpnet.pruning import PrunedModel, prune_module, top_k_indices

logger = logging.getLogger(__name__)

Batches = Iterable[Any]
"""Anything yielding (inputs, targets) pairs, e.g. a DataLoader."""


ALLOCATIONS = frozenset({"planned", "joint"})


@dataclass(frozen=True)
class TrainPruneConfig:
    """Settings of the train mode.

    Attributes:
        allocation: how the kept count of each group is decided.
            "planned" (default): by the architecture-only optimisation, gradient descent through
            LPNet maximising the capacity proxy under the budget (verified by measurement, when
            measuring, before any training); during joint training each group's open gates shrink
            from all to that count over `budget_warmup`, the highest-scoring filters stay open,
            and the task loss trains the gate MLPs (through `top_k_gates`) to score which filters
            earn their place.
            "joint": the counts too are learnt in joint training, each gate open where its score is
            positive, under LPNet's augmented-Lagrangian latency term and the capacity barrier.
            On distorted digits the joint counts narrowed the residual groups and kept the inner
            convolutions wide, and fine-tuned worse than the planned counts (see the README).
        max_skew: with the planned allocation, no group's keep ratio is more than this factor
            (at least 1) above or below the uniform ratio LPNet predicts at the budget (None: no
            bound; 1: uniform widths, floored onto the grid). LPNet fitted on a few dozen variants
            of a small network can see adding channels to a group as making it faster (a real
            effect of vector widths, or noise), and the plan then squeezes another group into a
            bottleneck (a residual stream of 16 of 256 channels feeding the classifier, in one
            digits run) that fine-tuning does not recover. At 2 the plans on distorted digits were
            still lopsided (a group at 8 of 128 channels beside groups at full width) and lost to
            uniform widths at 0.60 and 0.80 of the latency; 1.25 keeps LPNet's say on where the
            budget's last channels go without such bottlenecks (see the README's benchmarks). The
            same factor bounds each group's pruned share around the uniform one
            (`lpnet.gates.allocation.AllocationBand`, the band every planning mode uses).
        gate_epochs: epochs of joint training of weights and gates.
        finetune_epochs: epochs of fine-tuning after physical pruning.
        learning_rate: SGD (momentum 0.9) learning rate of the weights, cosine-decayed over joint
            training and fine-tuning as one schedule (`CosineSpan`).
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
        round_to: kept counts are multiples of this.
        min_keep_ratio: with the planned allocation, no group keeps less than this share of its
            channels unless the budget needs a uniform ratio under it (part of the same band).
        max_rounds: plan-and-measure rounds when measuring.
        verify_margin: verified plans aim at measuring budget * (1 - margin).
        verify_timings: timings of a plan that could end verification (the median is judged).
        max_batches: cap on batches per epoch (quick runs); None uses every batch.
        gates: gate network settings; the task loss has a gradient everywhere, so the gates need less
            exploration noise than in the data-free mode (strong noise acts like dropout and the
            network learns to shut noisy channels for good), and they start from the magnitude
            prior (`WGateConfig.magnitude_prior`) rather than a random ranking of the filters.
        seed: random seed.
    """

    allocation: str = "planned"
    max_skew: float | None = DEFAULT_MAX_SKEW
    gate_epochs: int = 5
    finetune_epochs: int = 5
    learning_rate: float = 0.05
    weight_decay: float = 5e-4
    gate_learning_rate: float = 0.002
    rho: float = 20.0
    dual_rate: float = 0.1
    capacity_weight: float = 0.5
    budget_warmup: float = 0.5
    round_to: int = 8
    min_keep_ratio: float = DEFAULT_MIN_KEEP_RATIO
    noise_anneal: float = 0.8
    max_rounds: int = 5
    verify_margin: float = 0.04
    verify_timings: int = 2
    max_batches: int | None = None
    gates: WGateConfig = field(default_factory=lambda: WGateConfig(noise=0.3, magnitude_prior=1.0))
    seed: int = 0


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


@dataclass(frozen=True)
class CosineSpan:
    """The part of a cosine learning-rate schedule `total` epochs long that starts at epoch `start`.

    The train mode runs joint training and fine-tuning as one schedule: the learning rate is still
    high when the gates have settled, so the network adapts to the channels it lost, instead of
    decaying to zero at the end of the joint phase and restarting for fine-tuning.
    """

    start: int
    total: int

    def factors(self, steps_per_epoch: int) -> Callable[[int], float]:
        """Learning-rate factor of the k-th step of this span."""
        offset = self.start * steps_per_epoch
        length = max(1, self.total * steps_per_epoch)

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(offset + step, length) / length))

        return factor


def evaluate_accuracy(module: nn.Module, batches: Batches, max_batches: int | None = None) -> float:
    """Top-1 accuracy of `module` (eval mode) on (inputs, targets) batches."""
    was_training = module.training
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for index, (inputs, targets) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            correct += int((module(inputs).argmax(1) == targets).sum())
            total += int(targets.numel())
    module.train(was_training)
    return correct / max(total, 1)


def train_epochs(
    module: nn.Module,
    batches: Batches,
    epochs: int,
    learning_rate: float,
    weight_decay: float = 5e-4,
    max_batches: int | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    extra_optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[int], None] | None = None,
    schedule: CosineSpan | None = None,
) -> list[float]:
    """Train with SGD (momentum 0.9, cosine decay) on cross-entropy; returns the mean loss per epoch.

    `extra_loss` is added to every step's loss (read after the forward), `extra_optimizer` steps
    alongside SGD, and `after_step(step)` runs after each step. The learning rate decays over these
    epochs, or over the part `schedule` names of a longer cosine schedule.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    per_epoch = max(max_batches if max_batches is not None else _length(batches), 1)
    span = schedule or CosineSpan(0, epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, span.factors(per_epoch))
    history: list[float] = []
    step = 0
    module.train()
    for _ in range(epochs):
        losses = []
        for index, (inputs, targets) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            loss = F.cross_entropy(module(inputs), targets)
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad(set_to_none=True)
            if extra_optimizer is not None:
                extra_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if extra_optimizer is not None:
                extra_optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(step)
            losses.append(float(loss.detach()))
            step += 1
        history.append(sum(losses) / max(len(losses), 1))
    module.eval()
    return history


def recalibrate_batch_norm(module: nn.Module, batches: Batches, max_batches: int = 20) -> None:
    """Recompute every BatchNorm's running statistics on data (weights untouched).

    Running statistics gathered while gates switched channels on and off, or before channels were
    removed, describe a network that no longer exists; a few forward passes fix them.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training = module.training
    module.train()
    with torch.no_grad():
        for index, (inputs, _targets) in enumerate(batches):
            if index >= max_batches:
                break
            module(inputs)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    module.train(was_training)


def _length(batches: Batches) -> int:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return 1


def planned_widths(banded: BandedFit, budget_ms: float, seed: int = 0) -> list[int]:
    """The planned allocation's widths for a budget: the architecture-only plan inside the band."""
    return banded(optimise_widths(banded.problem, budget_ms, PlanOptions(seed=seed)), budget_ms)


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
        InvalidPlanOptions: `max_skew` under 1, or `min_keep_ratio` outside (0, 1].
    """
    config = config or TrainPruneConfig()
    if config.allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {sorted(ALLOCATIONS)}, got {config.allocation!r}")
    policy = AllocationPolicy(config.max_skew, config.min_keep_ratio)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    problem = PlanningProblem.build(network, predictor, config.round_to, policy.grid_floor_ratio)
    banded = BandedFit(problem, policy)
    min_ms = problem.check_feasible(budget_ms)
    accuracy_before = evaluate_accuracy(module, val_batches)
    planned = config.allocation == "planned"
    gate_budget, notes = budget_ms, []

    def verify(
        first_ms: float, solve: Callable[[float], list[int]]
    ) -> tuple[list[int], list[VerificationRound], bool | None]:
        return verification_loop(
            problem,
            budget_ms,
            first_ms,
            min_ms,
            solve,
            measure,
            config.max_rounds,
            config.verify_margin,
            timings=config.verify_timings,
        )

    full_counts = list(problem.grid.full_widths)
    planned_counts = full_counts
    if planned:
        # Verified before training: re-planning after it would prune channels the network learnt
        # to rely on, or restore ones it learnt without (in the digits benchmark, accuracy right
        # after pruning fell up to 7 points below the gated network's when a round moved the widths).
        def plan_widths(internal_ms: float) -> list[int]:
            return planned_widths(banded, internal_ms, config.seed)

        first_ms = budget_ms if measure is None else max(min_ms, budget_ms * (1.0 - config.verify_margin))
        planned_counts, rounds, met = verify(first_ms, plan_widths)
    elif measure is not None:
        gate_budget, note = calibrated_budget(
            problem, budget_ms, min_ms, measure, config.verify_margin, policy
        )
        notes.append(note)

    model = copy.deepcopy(module)
    gate_set = GateSet(model, network, config.gates, track_weights=True, min_kept=problem.grid.min_widths)
    if planned:
        gate_set.set_counts(full_counts)
    constraint = AugmentedLagrangian(gate_budget, rho=config.rho, dual_rate=config.dual_rate, equality=True)
    gate_optimizer = torch.optim.Adam(gate_set.parameters(), lr=config.gate_learning_rate)
    last_latency: list[float] = []
    # Counts below the grid's minimum never become a plan; clamping keeps LPNet inside its domain.
    floor = torch.as_tensor(problem.grid.min_widths, dtype=torch.float32)  # (G,)

    def latency_term() -> torch.Tensor:
        counts = torch.maximum(gate_set.kept_counts(), floor)[None]  # (1, G)
        lat = problem.step_latency(counts)[0]
        last_latency.append(float(lat.detach()))
        term = constraint.penalty(lat)
        if config.capacity_weight > 0:
            term = term - config.capacity_weight * problem.capacity.per_layer(counts)[0]
        return term

    total_epochs = config.gate_epochs + config.finetune_epochs
    per_epoch = config.max_batches if config.max_batches is not None else _length(train_batches)
    total_steps = config.gate_epochs * max(per_epoch, 1)
    anneal_steps = config.noise_anneal * total_steps
    warmup_steps = config.budget_warmup * total_steps
    with torch.no_grad():
        start_ms = float(problem.latency(problem.tn.full_widths[None])[0])
    constraint.budget_ms = warmup_budget(start_ms, gate_budget, 0.0 if warmup_steps > 0 else 1.0)

    def shrink_counts(step: int) -> None:
        # The planned counts, reached over the warm-up: from all channels open to the plan.
        done = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        gate_set.set_counts(
            [round(f - (f - p) * done) for f, p in zip(full_counts, planned_counts, strict=True)]
        )
        if anneal_steps > 0:
            gate_set.noise_scale = config.gates.noise * max(0.0, 1.0 - (step + 1) / anneal_steps)

    def dual_step(step: int) -> None:
        if last_latency:
            constraint.update(last_latency[-1])
        if warmup_steps > 0:
            constraint.budget_ms = warmup_budget(start_ms, gate_budget, (step + 1) / warmup_steps)
        if step % 20 == 0 and last_latency:
            logger.debug(
                "step %d: predicted %.3f ms (budget now %.3f ms), multiplier %.3f",
                step,
                last_latency[-1],
                constraint.budget_ms,
                constraint.multiplier,
            )
        if anneal_steps > 0:
            # Decay the gate noise to zero so the network finishes training under the gates it keeps.
            gate_set.noise_scale = config.gates.noise * max(0.0, 1.0 - (step + 1) / anneal_steps)

    gate_set.train()
    with gate_set.attached(model):
        losses = train_epochs(
            model,
            train_batches,
            config.gate_epochs,
            config.learning_rate,
            config.weight_decay,
            config.max_batches,
            extra_loss=None if planned else latency_term,
            extra_optimizer=gate_optimizer,
            after_step=shrink_counts if planned else dual_step,
            schedule=CosineSpan(0, total_epochs),
        )
        gate_set.eval()
        recalibrate_batch_norm(model, train_batches, config.max_batches or 20)
        accuracy_gated = evaluate_accuracy(model, val_batches)
        with torch.no_grad():
            gated_counts = [int(g.sum()) for g in gate_set.compute()]
    logger.info(
        "joint training: losses %s, last predicted %.3f ms (budget %.3f ms), gated accuracy %.4f",
        [round(v, 4) for v in losses],
        last_latency[-1] if last_latency else float("nan"),
        gate_budget,
        accuracy_gated,
    )
    with torch.no_grad():
        scores = [s.detach() for s in gate_set.scores()]
    widths = planned_counts
    if not planned:
        target = gate_set.expected_counts(scores)
        widths, rounds, met = verify(gate_budget, lambda internal_ms: problem.fit(target, internal_ms))
    kept = [top_k_indices(s, k) for s, k in zip(scores, widths, strict=True)]
    pruned = prune_module(model, network, widths, kept)
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
            schedule=CosineSpan(config.gate_epochs, total_epochs),
        )
    accuracy_after = evaluate_accuracy(pruned.module, val_batches)
    result = build_result(
        problem,
        PlanMode.TRAIN.value,
        budget_ms,
        config.round_to,
        widths,
        kept,
        rounds,
        met,
        min_ms,
        start,
        scores,
        # The joint allocation's counts are the gates' own: they are reported, not held to the band.
        banded.band(selected_budget(rounds)) if planned else None,
    )
    result.warnings.extend(notes)
    return TrainedPlan(
        plan=result,
        pruned=pruned,
        accuracy_before=accuracy_before,
        accuracy_gated=accuracy_gated,
        accuracy_pruned=accuracy_pruned,
        accuracy_after=accuracy_after,
        gated_counts=gated_counts,
        seconds=time.perf_counter() - start,
    )
