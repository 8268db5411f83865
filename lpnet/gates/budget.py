"""The latency budget as a constraint, and rounding that lands on the low side of latency steps.

Two pieces:

- `AugmentedLagrangian`: the differentiable latency term of an objective. `budget_ms` is a
  constraint, not a target: below it the term is flat (it only pays back an existing multiplier),
  above it a multiplier grows until the constraint holds, so the solution sits at the budget rather
  than wherever a fixed penalty weight would put it.
- `fit_widths_to_budget`: turns continuous kept counts into a valid width vector on a grid of
  multiples of `round_to` (and of each group's divisor) whose *predicted* latency is at or under
  the budget. Latency is a staircase in the channel count (flat within SIMD blocks, then a jump), so
  rounding each count to the nearest multiple is not enough: after flooring (and, when that is
  still over budget, shrinking the whole target by one factor, which keeps the shape the gates
  chose), it greedily takes back the steps that buy the most capacity per millisecond, free steps
  first, and stops before the budget. It ends where one more step would cross the budget: on the
  low side of a step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lpnet.arch.groups import ChannelLayout
from lpnet.errors import BudgetInfeasible

logger = logging.getLogger(__name__)

LatencyFn = Callable[[torch.Tensor], torch.Tensor]
"""Width vectors (B, G) -> latency (B,) in ms."""
CapacityFn = Callable[[torch.Tensor], torch.Tensor]
"""Width vectors (B, G) -> capacity (B,)."""

# Moves the greedy rounding may make before giving up (each is one batched predictor call).
MAX_ROUNDING_MOVES = 5000


@dataclass(frozen=True)
class WidthGrid:
    """The widths each group may take: multiples of its step from its minimum up, plus its full width.

    Groups narrower than one step can only stay whole.
    """

    channels: tuple[int, ...]
    step: tuple[int, ...]
    minimum: tuple[int, ...]

    @property
    def num_groups(self) -> int:
        return len(self.channels)

    @property
    def min_widths(self) -> list[int]:
        return list(self.minimum)

    @property
    def full_widths(self) -> list[int]:
        return list(self.channels)

    def allowed(self, group: int) -> list[int]:
        """Every width group `group` may take, ascending."""
        full, step, low = self.channels[group], self.step[group], self.minimum[group]
        values = list(range(low, full + 1, step)) if low < full else []
        if not values or values[-1] != full:
            values.append(full)
        return values

    def floor(self, widths: Sequence[float]) -> list[int]:
        """The largest allowed width at or under each value (the minimum when a value is below it)."""
        out = []
        for g, value in enumerate(widths):
            below = [w for w in self.allowed(g) if w <= value + 1e-6]
            out.append(below[-1] if below else self.minimum[g])
        return out

    def ceil(self, widths: Sequence[float]) -> list[int]:
        """The smallest allowed width at or over each value (the full width when a value is above it)."""
        out = []
        for g, value in enumerate(widths):
            above = [w for w in self.allowed(g) if w >= value - 1e-6]
            out.append(above[0] if above else self.channels[g])
        return out

    def nearest(self, widths: Sequence[float]) -> list[int]:
        """The allowed width nearest to each value (ties go down)."""
        out = []
        for g, value in enumerate(widths):
            allowed = self.allowed(g)
            distances = [(abs(w - float(value)), w) for w in allowed]
            out.append(min(distances)[1])
        return out

    def step_up(self, group: int, width: int) -> int | None:
        """The next allowed width above `width`, or None at the top."""
        return next((w for w in self.allowed(group) if w > width), None)

    def step_down(self, group: int, width: int) -> int | None:
        """The next allowed width below `width`, or None at the minimum."""
        below = [w for w in self.allowed(group) if w < width]
        return below[-1] if below else None


def width_grid(layout: ChannelLayout, round_to: int = 8, min_keep_ratio: float = 0.05) -> WidthGrid:
    """The grid of allowed widths: multiples of lcm(round_to, divisor), at least `min_keep_ratio` kept.

    Args:
        layout: the network's channel groups.
        round_to: kept counts are multiples of this (8 matches the SIMD width of most CPUs).
        min_keep_ratio: no group keeps fewer than this share of its channels (and never fewer than
            one step).
    """
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    if not 0.0 <= min_keep_ratio <= 1.0:
        raise ValueError(f"min_keep_ratio must be in [0, 1], got {min_keep_ratio}")
    steps, minimums = [], []
    for group in layout.groups:
        step = math.lcm(round_to, group.divisor)
        low = max(step, step * math.ceil(min_keep_ratio * group.channels / step))
        steps.append(step)
        minimums.append(min(low, group.channels))
    return WidthGrid(tuple(layout.full_widths), tuple(steps), tuple(minimums))


@dataclass
class AugmentedLagrangian:
    """Powell-Hestenes-Rockafellar augmented Lagrangian for `latency <= budget`.

    With c = latency / budget - 1 (scale-free), the term is (relu(lambda + rho c)^2 - lambda^2) / (2 rho):
    zero gradient well inside the budget, a growing push outside it, and `update` moves lambda by
    dual_rate * c (never below zero) so a persistent violation is priced until it goes away.

    The textbook update (dual_rate = rho after each inner solve) overshoots when the primal moves at
    a fixed rate, as it does under Adam: the multiplier keeps growing while the solution is still
    travelling towards the budget, then drives it far below. Updating every step with a small rate
    lets the quadratic term do the steering and the multiplier remove what violation remains.

    With `equality` the term is lambda c + rho c^2 / 2 and lambda may go negative: latency is pulled
    to the budget from both sides. Gate training uses it because nothing else there pulls latency
    up (the task loss is indifferent to a channel the network has learnt to do without), and a gate
    solution far under the budget leaves the final rounding to re-add channels the network never
    trained with; the rounding then enforces the inequality.
    """

    budget_ms: float
    rho: float = 20.0
    dual_rate: float = 1.0
    equality: bool = False
    multiplier: float = 0.0
    history: list[float] = field(default_factory=list)

    def violation(self, latency_ms: torch.Tensor) -> torch.Tensor:
        return latency_ms / self.budget_ms - 1.0

    def penalty(self, latency_ms: torch.Tensor) -> torch.Tensor:
        """The differentiable constraint term for a latency (scalar tensor)."""
        c = self.violation(latency_ms)
        if self.equality:
            return self.multiplier * c + 0.5 * self.rho * c**2
        return (torch.relu(self.multiplier + self.rho * c) ** 2 - self.multiplier**2) / (2 * self.rho)

    def update(self, latency_ms: float) -> None:
        """Dual ascent step on the multiplier.

        The violation is clipped to [-1, 1] here (not in the penalty): one wild prediction, e.g. of
        an extrapolated width vector, would otherwise inflate the multiplier for the rest of the run.
        """
        c = min(1.0, max(-1.0, latency_ms / self.budget_ms - 1.0))
        self.multiplier += self.dual_rate * c
        if not self.equality:
            self.multiplier = max(0.0, self.multiplier)
        self.history.append(self.multiplier)


def warmup_budget(start_ms: float, budget_ms: float, progress: float) -> float:
    """The constraint's budget `progress` (0..1) of the way from `start_ms` to `budget_ms`, geometrically.

    Gates that must reach a budget far below the unpruned latency overshoot when it is imposed at
    once: they all close within a few steps and the task loss never reopens them. Moving the budget
    down gradually lets the network adapt while channels go.
    """
    if progress >= 1.0 or start_ms <= budget_ms:
        return budget_ms
    return start_ms * (budget_ms / start_ms) ** max(0.0, progress)


def predicted_latency(latency: LatencyFn, widths: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
    """Latency (B,) of integer width vectors without a gradient."""
    batch = torch.as_tensor(widths, dtype=torch.float32)
    if batch.dim() == 1:
        batch = batch[None]  # (1, G)
    with torch.no_grad():
        return latency(batch)


def check_feasible(grid: WidthGrid, latency: LatencyFn, budget_ms: float) -> float:
    """The smallest achievable predicted latency (all groups at their minimum).

    Raises:
        BudgetInfeasible: when it exceeds `budget_ms`.
    """
    floor_ms = float(predicted_latency(latency, grid.min_widths)[0])
    if floor_ms > budget_ms:
        full_ms = float(predicted_latency(latency, grid.full_widths)[0])
        raise BudgetInfeasible(budget_ms, floor_ms, full_ms)
    return floor_ms


def fit_widths_to_budget(
    target: Sequence[float],
    grid: WidthGrid,
    latency: LatencyFn,
    capacity: CapacityFn,
    budget_ms: float,
    ceiling: Sequence[float] | None = None,
    floor: Sequence[float] | None = None,
) -> list[int]:
    """A grid width vector near `target` whose predicted latency is at or under `budget_ms`.

    Floors `target` onto the grid. When that is over budget, shrinks the target towards the minimum
    widths (towards `floor`, where given and above them) by one common factor, the largest whose
    floored widths fit (`scale_to_budget`): the target's shape is what the gates trained the
    network under, and a later verification round only moves the budget. Should no factor fit (grid
    effects), takes the steps down that save the most latency per unit of capacity lost. Then, while some step up still fits, takes the one that gains
    the most capacity per millisecond (steps that cost nothing first), never above `ceiling[g]` for
    group g when a ceiling is given. Callers check feasibility first.
    """
    widths = grid.floor(target)
    current = float(predicted_latency(latency, widths)[0])
    if current > budget_ms:
        widths, current = scale_to_budget(target, grid, latency, budget_ms, floor)
    moves = 0
    while current > budget_ms and moves < MAX_ROUNDING_MOVES:
        moved = _best_move(widths, grid, latency, capacity, budget_ms, down=True)
        if moved is None:
            break
        widths, current = moved
        moves += 1
    while moves < MAX_ROUNDING_MOVES:
        moved = _best_move(widths, grid, latency, capacity, budget_ms, down=False, ceiling=ceiling)
        if moved is None:
            break
        widths, current = moved
        moves += 1
    if moves >= MAX_ROUNDING_MOVES:
        logger.warning("width rounding stopped after %d moves; the plan may keep capacity unused", moves)
    return widths


# Shrink factors tried at once by `scale_to_budget` (one batched predictor call per pass).
SCALE_CANDIDATES = 64


def scale_to_budget(
    target: Sequence[float],
    grid: WidthGrid,
    latency: LatencyFn,
    budget_ms: float,
    floor: Sequence[float] | None = None,
) -> tuple[list[int], float]:
    """The widths floor(low + f (target - low)) for the largest f in [0, 1] predicted at or under the budget.

    `low` is the grid's minimum widths, or `floor` where given and above them. Two batched passes: a
    coarse grid of factors, then a fine one just above the best coarse factor. Returns the widths
    and their predicted latency (the floored `low` when even f = 0 is over).
    """
    low = torch.as_tensor(grid.min_widths, dtype=torch.float32)  # (G,)
    if floor is not None:
        low = torch.maximum(low, torch.as_tensor([float(v) for v in floor]))
    goal = torch.maximum(torch.as_tensor([float(v) for v in target]), low)  # (G,)
    start = grid.floor(low.tolist())
    best: tuple[list[int], float] = (start, float(predicted_latency(latency, start)[0]))
    lo, hi = 0.0, 1.0
    for _ in range(2):
        factors = torch.linspace(lo, hi, SCALE_CANDIDATES)  # (S,)
        scaled = low + factors[:, None] * (goal - low)  # (S, G)
        candidates = [grid.floor(row.tolist()) for row in scaled]
        lat = predicted_latency(latency, candidates)  # (S,)
        fits = torch.nonzero(lat <= budget_ms).flatten()
        if len(fits) == 0:
            break
        k = int(fits.max())
        best = (candidates[k], float(lat[k]))
        if k == SCALE_CANDIDATES - 1:
            break
        lo, hi = float(factors[k]), float(factors[k + 1])
    return best


def _best_move(
    widths: list[int],
    grid: WidthGrid,
    latency: LatencyFn,
    capacity: CapacityFn,
    budget_ms: float,
    down: bool,
    ceiling: Sequence[float] | None = None,
) -> tuple[list[int], float] | None:
    candidates: list[list[int]] = []
    for g in range(grid.num_groups):
        nxt = grid.step_down(g, widths[g]) if down else grid.step_up(g, widths[g])
        if nxt is not None and (down or ceiling is None or nxt <= ceiling[g]):
            candidates.append([*widths[:g], nxt, *widths[g + 1 :]])
    if not candidates:
        return None
    batch = torch.as_tensor([widths, *candidates], dtype=torch.float32)  # (1 + K, G)
    with torch.no_grad():
        lat = latency(batch)  # (1 + K,)
        cap = capacity(batch)  # (1 + K,)
    d_lat = lat[1:] - lat[0]  # (K,)
    d_cap = cap[1:] - cap[0]  # (K,)
    # A floor on |d_lat| keeps the ratio finite; steps the predictor calls free rank by capacity alone.
    tiny = 1e-4 * budget_ms
    if down:
        saving = -d_lat
        if bool((saving > 0).any()):
            score = torch.where(saving > 0, saving / (-d_cap).clamp_min(1e-9), torch.full_like(saving, -1.0))
        else:
            # No step saves anything by the predictor's account: take the least harmful one and keep
            # descending; the loop ends at the minimum widths, which the caller has checked fit.
            score = saving
    else:
        fits = lat[1:] <= budget_ms
        if not bool(fits.any()):
            return None
        score = d_cap / d_lat.clamp_min(tiny)
        score = torch.where(fits, score, torch.full_like(score, -math.inf))
    best = int(torch.argmax(score))
    return candidates[best], float(lat[1 + best])
