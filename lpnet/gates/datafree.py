"""Data-free W-Gates: learn which filters matter from the weights alone.

Without a dataset, the objective is to keep the pruned network's outputs close to the unpruned
network's on inputs synthesised from the network itself:

1. Synthesis (as in DeepInversion, Yin et al., 2020): start from Gaussian noise and optimise the
   inputs so that the batch mean and variance of every BatchNorm layer's input match that layer's
   running statistics, with a small L2 prior on the pixels. The BN statistics summarise the training
   data the weights were fitted on; inputs that reproduce them excite the network the way real data
   does. Synthesis runs at a reduced resolution when the network accepts it (fully convolutional
   networks with adaptive pooling), which keeps it affordable for 224x224 models on a CPU.
2. Gate optimisation: the network's weights stay frozen; the W-Gates learn to minimise the relative
   squared error between the gated network's outputs and the unpruned outputs on those inputs,
   plus the augmented-Lagrangian latency term on the kept counts predicted by LPNet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from lpnet.arch.ir import Network
from lpnet.gates.budget import AugmentedLagrangian, LatencyFn, warmup_budget
from lpnet.gates.wgates import GateSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataFreeConfig:
    """Settings of input synthesis and of the data-free gate optimisation.

    Attributes:
        batch_size: synthetic images.
        resolution: synthesise at min(H, resolution) square inputs when the network accepts that size
            with the same output shape; None keeps the network's own input size.
        synth_steps: optimisation steps of the synthetic inputs.
        synth_lr: their Adam learning rate.
        gate_steps: optimisation steps of the gates.
        gate_lr: the gates' Adam learning rate.
        rho: augmented-Lagrangian penalty weight.
        dual_rate: multiplier step per optimisation step, per unit of relative violation.
        budget_warmup: share of the steps over which the constraint's budget moves from the
            unpruned predicted latency down to the budget (`lpnet.gates.budget.warmup_budget`).
        seed: random seed of the synthesis and the gate initialisation.
    """

    batch_size: int = 8
    resolution: int | None = 64
    synth_steps: int = 30
    synth_lr: float = 0.1
    gate_steps: int = 120
    gate_lr: float = 0.01
    rho: float = 20.0
    dual_rate: float = 0.1
    budget_warmup: float = 0.5
    seed: int = 0


@dataclass
class GateOutcome:
    """What the gate optimisation ends with.

    Attributes:
        counts: kept channels per group (sum of the binary gates).
        scores: per group, each filter's final score (C_g,); higher means keep.
        loss_history: output-matching loss every step.
        latency_history: predicted latency (ms) of the gated counts every step.
    """

    counts: list[float]
    scores: list[torch.Tensor]
    loss_history: list[float] = field(default_factory=list)
    latency_history: list[float] = field(default_factory=list)


def synthesis_shape(module: nn.Module, network: Network, resolution: int | None) -> tuple[int, int, int]:
    """(C, H, W) to synthesise at: reduced to `resolution` when the module accepts it, else native."""
    _, channels, height, width = network.input_shape
    if resolution is None or (resolution >= height and resolution >= width):
        return channels, height, width
    small = (channels, min(height, resolution), min(width, resolution))
    try:
        with torch.no_grad():
            native = module(torch.zeros(1, channels, height, width))
            reduced = module(torch.zeros(1, *small))
    except RuntimeError as exc:  # fixed-size layers (flatten then linear) reject other sizes
        logger.info("network does not run at %s (%s); synthesising at its native size", small, exc)
        return channels, height, width
    if tuple(native.shape) != tuple(reduced.shape):
        return channels, height, width
    return small


def output_mismatch(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative squared error ||s - t||^2 / ||t||^2 (scale-free, 0 when the outputs agree)."""
    return ((student - teacher) ** 2).sum() / (teacher**2).sum().clamp_min(1e-12)


def synthesize_inputs(module: nn.Module, network: Network, config: DataFreeConfig) -> torch.Tensor:
    """Inputs (B, C, H, W) whose BatchNorm statistics match the module's running statistics."""
    generator = torch.Generator().manual_seed(config.seed)
    shape = synthesis_shape(module, network, config.resolution)
    inputs = torch.randn(config.batch_size, *shape, generator=generator)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    if not norms or config.synth_steps == 0:
        logger.info("no BatchNorm statistics to match; using Gaussian noise as inputs")
        return inputs
    losses: list[torch.Tensor] = []

    def match_statistics(bn: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = args[0]  # (B, C, H, W)
        mean = x.mean(dim=(0, 2, 3))  # (C,)
        var = x.var(dim=(0, 2, 3), unbiased=False)  # (C,)
        running_mean, running_var = bn.get_buffer("running_mean"), bn.get_buffer("running_var")
        losses.append(
            torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)
        )

    handles = [bn.register_forward_hook(match_statistics) for bn in norms]
    was_training = module.training
    requires = [p.requires_grad for p in module.parameters()]
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    inputs.requires_grad_(True)
    optimizer = torch.optim.Adam([inputs], lr=config.synth_lr)
    try:
        for step in range(config.synth_steps):
            losses.clear()
            module(inputs)
            loss = torch.stack(losses).sum() + 1e-4 * inputs.pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step == 0 or step == config.synth_steps - 1:
                logger.debug("synthesis step %d: BN statistics loss %.4f", step, float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(module.parameters(), requires, strict=True):
            p.requires_grad_(flag)
        module.train(was_training)
    return inputs.detach()


def optimise_gates_datafree(
    module: nn.Module,
    gate_set: GateSet,
    latency: LatencyFn,
    budget_ms: float,
    inputs: torch.Tensor,
    config: DataFreeConfig,
) -> GateOutcome:
    """Train the gates (weights frozen) to match the unpruned outputs under the latency budget."""
    module.eval()
    requires = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        teacher = module(inputs)  # (B, classes): the unpruned network's answer
    constraint = AugmentedLagrangian(budget_ms, rho=config.rho, dual_rate=config.dual_rate, equality=True)
    optimizer = torch.optim.Adam(gate_set.parameters(), lr=config.gate_lr)
    # Counts below the grid's minimum never become a plan; clamping keeps LPNet inside its domain.
    floor = torch.as_tensor([float(k) for k in gate_set.min_kept])  # (G,)
    with torch.no_grad():
        start_ms = float(
            latency(torch.stack([f.shape[0] * torch.ones(()) for f in gate_set.filters()])[None])[0]
        )
    warmup_steps = config.budget_warmup * config.gate_steps
    outcome = GateOutcome(counts=[], scores=[])
    gate_set.train()  # noisy gates while learning
    try:
        with gate_set.attached(module):
            for step in range(config.gate_steps):
                if warmup_steps > 0:
                    constraint.budget_ms = warmup_budget(start_ms, budget_ms, step / warmup_steps)
                student = module(inputs)  # the pre-hook recomputes the gates from the current MLPs
                counts = gate_set.kept_counts()  # (G,)
                lat = latency(torch.maximum(counts, floor)[None])[0]
                mismatch = output_mismatch(student, teacher)
                loss = mismatch + constraint.penalty(lat)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                constraint.update(float(lat.detach()))
                outcome.loss_history.append(float(mismatch.detach()))
                outcome.latency_history.append(float(lat.detach()))
    finally:
        gate_set.eval()
        for p, flag in zip(module.parameters(), requires, strict=True):
            p.requires_grad_(flag)
    with torch.no_grad():
        outcome.scores = [s.detach() for s in gate_set.scores()]
    outcome.counts = gate_set.expected_counts(outcome.scores)
    logger.info(
        "data-free gates: mismatch %.4f, predicted %.3f ms for budget %.3f ms after %d steps",
        outcome.loss_history[-1] if outcome.loss_history else float("nan"),
        outcome.latency_history[-1] if outcome.latency_history else float("nan"),
        budget_ms,
        config.gate_steps,
    )
    return outcome
