"""Baseline pruning criteria, and matching a baseline to a latency.

Every criterion maps one scalar `ratio` in (0, 1] (the share of channels kept) to a `Selection`:
a width vector on the same grid the planner uses and the channels kept per group. Selections go
through the same physical pruning (`lpnet.pruning.prune_module`) as W-Gates plans, so comparisons are
like for like.

- `uniform`: every group keeps `ratio` of its channels, the first ones (a width multiplier).
- `l1-layer`: every group keeps `ratio` of its channels, those with the largest L1 norm.
- `l1-global`: one threshold over all filters' L1 norms, each normalised by its group's mean
  (torch-pruning's default normaliser; raw norms are not comparable across layers).
- `taylor`: first-order Taylor importance (Molchanov et al., 2019): for each channel, the squared
  change in the loss a gate on it would see, (sum over a batch of activation * gradient)^2, summed
  over batches; one global threshold over scores normalised by their group's mean, as Molchanov et
  al. (2017) normalise per layer: pruned in one shot, raw scores send whole late stages (small
  gradients) to the minimum width.

`match_latency` finds, by bisection on the ratio, the largest selection of a criterion whose latency
(predicted or measured: any `Callable[[Network], float]`) is at or under a target.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.arch.ir import Network
from lpnet.gates.budget import WidthGrid
from lpnet.gates.wgates import gate_points
from lpnet.pruning import group_l1_scores, layer_modules, top_k_indices

logger = logging.getLogger(__name__)

LatencyOf = Callable[[Network], float]


@dataclass(frozen=True)
class Selection:
    """Widths and kept channels chosen by a criterion at one ratio."""

    criterion: str
    ratio: float
    widths: list[int]
    kept_indices: list[list[int]]


class PruningCriterion(ABC):
    """Chooses widths and channels for a keep ratio."""

    name: str = ""

    @abstractmethod
    def select(self, module: nn.Module, network: Network, ratio: float, grid: WidthGrid) -> Selection:
        """The selection keeping about `ratio` of the channels."""


def _uniform_widths(grid: WidthGrid, ratio: float) -> list[int]:
    return grid.nearest([ratio * c for c in grid.channels])


class UniformWidth(PruningCriterion):
    """The same share of every group, first channels kept (no importance at all)."""

    name = "uniform"

    def select(self, module: nn.Module, network: Network, ratio: float, grid: WidthGrid) -> Selection:  # noqa: ARG002
        widths = _uniform_widths(grid, ratio)
        return Selection(self.name, ratio, widths, [list(range(k)) for k in widths])


class ScoredCriterion(PruningCriterion):
    """A criterion from per-channel scores, per layer (uniform widths) or with one global threshold."""

    normalise: ClassVar[bool] = False

    def __init__(self, scope: str = "global") -> None:
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.scope = scope
        # Scores of the last module scored; bisection selects many ratios of the same module.
        self._cached: tuple[nn.Module, list[torch.Tensor]] | None = None

    @abstractmethod
    def scores(self, module: nn.Module, network: Network) -> list[torch.Tensor]:
        """Per group, one importance score per channel (C_g,)."""

    def cached_scores(self, module: nn.Module, network: Network) -> list[torch.Tensor]:
        """`scores`, computed once per module (the module must not change in between)."""
        if self._cached is None or self._cached[0] is not module:
            self._cached = (module, [s.detach().float() for s in self.scores(module, network)])
        return self._cached[1]

    def select(self, module: nn.Module, network: Network, ratio: float, grid: WidthGrid) -> Selection:
        scores = self.cached_scores(module, network)
        if self.scope == "layer":
            widths = _uniform_widths(grid, ratio)
        else:
            widths = global_widths(scores, ratio, grid, normalise=self.normalise)
        kept = [top_k_indices(s, k) for s, k in zip(scores, widths, strict=True)]
        return Selection(self.name, ratio, widths, kept)


class L1Magnitude(ScoredCriterion):
    """L1 norm of each output filter, summed over a group's coupled layers."""

    normalise = True

    def __init__(self, scope: str = "global") -> None:
        super().__init__(scope)
        self.name = f"l1-{scope}"

    def scores(self, module: nn.Module, network: Network) -> list[torch.Tensor]:
        return group_l1_scores(module, network)


class TaylorImportance(ScoredCriterion):
    """First-order Taylor importance from gradients on a few batches of data.

    Args:
        batches: (inputs, targets) pairs, e.g. a DataLoader.
        max_batches: how many to use.
        loss_fn: the task loss (cross-entropy by default).
        scope: "global" (Molchanov et al.) or "layer".
    """

    name = "taylor"
    normalise = True

    def __init__(
        self,
        batches: Iterable[Any],
        max_batches: int = 8,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        scope: str = "global",
    ) -> None:
        super().__init__(scope)
        self.batches = batches
        self.max_batches = max_batches
        self.loss_fn = loss_fn

    def scores(self, module: nn.Module, network: Network) -> list[torch.Tensor]:
        return taylor_scores(module, network, self.batches, self.max_batches, self.loss_fn)


def global_widths(
    scores: Sequence[torch.Tensor], ratio: float, grid: WidthGrid, normalise: bool = False
) -> list[int]:
    """Widths from one threshold over every group's scores, keeping `ratio` of all channels.

    Each group's count is snapped to the nearest grid width (never under its minimum).
    """
    values = [s / s.mean().clamp_min(1e-12) if normalise else s for s in scores]
    flat = torch.cat(values)  # (sum C_g,)
    keep = max(1, round(ratio * flat.numel()))
    threshold = torch.topk(flat, keep).values[-1]
    counts = [float((v >= threshold).sum()) for v in values]
    return grid.nearest(counts)


def taylor_scores(
    module: nn.Module,
    network: Network,
    batches: Iterable[Any],
    max_batches: int = 8,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> list[torch.Tensor]:
    """Per group, sum over batches of (sum over the batch of activation * gradient)^2: (C_g,).

    Activations are taken at the group's gate points (after the BN that follows a conv), so the
    score is the first-order loss change of switching the whole coupled channel off. The module runs
    in eval mode (BatchNorm statistics are not touched).
    """
    layout = channel_layout(network)
    modules = layer_modules(module, network)
    points = gate_points(network, layout)
    scores = [torch.zeros(g.channels) for g in layout.groups]
    per_batch: list[torch.Tensor] = [torch.zeros(g.channels) for g in layout.groups]

    def make_hook(group: int) -> Any:
        def hook(_m: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            def grad_hook(grad: torch.Tensor) -> None:
                dims = [0, *range(2, output.dim())]
                per_batch[group] += (output.detach() * grad).sum(dim=dims).float()  # (C,)

            output.register_hook(grad_hook)

        return hook

    handles = [
        modules[name].register_forward_hook(make_hook(g)) for g, names in enumerate(points) for name in names
    ]
    was_training = module.training
    module.eval()
    used = 0
    try:
        for batch in batches:
            if used >= max_batches:
                break
            inputs, targets = batch[0], batch[1]
            for p in per_batch:
                p.zero_()
            module.zero_grad(set_to_none=True)
            loss = loss_fn(module(inputs), targets)
            loss.backward()
            for total, p in zip(scores, per_batch, strict=True):
                total += p**2
            used += 1
    finally:
        for handle in handles:
            handle.remove()
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    if used == 0:
        raise ValueError("Taylor importance needs at least one batch of data")
    return scores


CRITERIA: dict[str, Callable[..., PruningCriterion]] = {
    "uniform": UniformWidth,
    "l1-layer": lambda: L1Magnitude("layer"),
    "l1-global": lambda: L1Magnitude("global"),
    "taylor": TaylorImportance,
}


def get_criterion(name: str, **kwargs: Any) -> PruningCriterion:
    """Instantiate a registered criterion (`taylor` needs `batches=`)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name](**kwargs)


def match_latency(
    criterion: PruningCriterion,
    module: nn.Module,
    network: Network,
    grid: WidthGrid,
    latency_of: LatencyOf,
    target_ms: float,
    iterations: int = 10,
    min_ratio: float = 0.02,
) -> tuple[Selection, float]:
    """The largest-ratio selection whose latency is at or under `target_ms`, by bisection.

    Latency is evaluated once per distinct width vector. Returns the selection and its latency; when
    even `min_ratio` is over the target, that selection is returned (and logged).
    """
    seen: dict[tuple[int, ...], float] = {}

    def latency(selection: Selection) -> float:
        key = tuple(selection.widths)
        if key not in seen:
            seen[key] = latency_of(apply_width_vector(network, selection.widths))
        return seen[key]

    top = criterion.select(module, network, 1.0, grid)
    if latency(top) <= target_ms:
        return top, latency(top)
    low = criterion.select(module, network, min_ratio, grid)
    if latency(low) > target_ms:
        logger.warning(
            "%s cannot reach %.3f ms: at ratio %.2f it takes %.3f ms",
            criterion.name,
            target_ms,
            min_ratio,
            latency(low),
        )
        return low, latency(low)
    lo, hi, best = min_ratio, 1.0, low
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        candidate = criterion.select(module, network, mid, grid)
        if latency(candidate) <= target_ms:
            lo, best = mid, candidate
        else:
            hi = mid
    return best, latency(best)
