"""The allocation band: how uneven a plan's per-group keep ratios may be, in every planning mode.

A plan that follows the latency predictor all the way ends lopsided: LPNet's word on where a channel
is cheap is uncertain, and the optimum it points to can cut one group to 8 of its 128 channels
beside groups kept at 75 %, a bottleneck that fine-tuning does not recover (the README's "The
allocation band"). Every mode therefore plans inside one band:

- around r, the largest keep ratio that every group can share under the budget (`uniform_ratio`),
  each group keeps between max(r / s, 1 - (1 - r) s) and min(r s, 1 - (1 - r) / s) of its channels,
  s = `AllocationPolicy.max_skew` (the second terms bound the pruned share by the same factor, which
  binds at mild pruning: at r = 0.85 and s = 1.25 the band is 0.81-0.88, not 0.68-1.0);
- and at least `AllocationPolicy.min_keep_ratio` of them. When the budget needs a uniform ratio
  under that minimum, the minimum gives way to the uniform widths, and the plan says so.

On the grid of allowed widths (`lpnet.gates.budget.WidthGrid`) the factor's lower edge is rounded up
but never above the group's uniform width (so a factor of 1 gives the uniform widths), the minimum is
rounded up, and the upper edge is rounded down (never under the lower edge). The plan's target is
clamped into the band, rounding adds channels back only up to its upper edge, and an over-budget
target shrinks towards its lower edge, or starts again from the uniform widths (`BandedFit`). A plan
leaves the band only where neither is predicted to meet the budget, and its `warnings` then name
the groups and the numbers (`AllocationBand.warnings`).

The band follows the budget: verification rounds plan for different internal budgets, and each
round's target is moved into the band at its own budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lpnet.gates.options import MAX_SKEW, MIN_KEEP_RATIO, check_options
from lpnet.gates.result import AllocationSummary

if TYPE_CHECKING:
    from lpnet.gates.budget import WidthGrid
    from lpnet.gates.problem import PlanningProblem

# The grid's own floor: no plan keeps less than this share of a group, even to meet a budget (a lower
# `min_keep_ratio` lowers it too).
GRID_FLOOR_RATIO = 0.05
# Groups named one by one in a warning.
LISTED_GROUPS = 5


@dataclass(frozen=True)
class AllocationPolicy:
    """How uneven a plan may be.

    Attributes:
        max_skew: each group's keep ratio stays within this factor (at least 1) of the uniform keep
            ratio that meets the budget, and its pruned share within the same factor of the uniform
            pruned share (None: no band around the uniform ratio; 1: uniform widths, floored onto
            the grid).
        min_keep_ratio: no group keeps less than this share of its channels (in (0, 1]) unless the
            budget needs a uniform ratio under it.

    Both are declared from `lpnet.gates.options` (`MAX_SKEW`, `MIN_KEEP_RATIO`).

    Raises:
        InvalidPlanOptions: `max_skew` under 1 or not finite, `min_keep_ratio` outside (0, 1].
    """

    max_skew: float | None = MAX_SKEW.field()
    min_keep_ratio: float = MIN_KEEP_RATIO.field()

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def grid_floor_ratio(self) -> float:
        """The share of a group no plan goes under, even to meet a budget (the grid's minimum)."""
        return min(GRID_FLOOR_RATIO, self.min_keep_ratio)


def uniform_ratio(problem: PlanningProblem, budget_ms: float, iterations: int = 30) -> float:
    """The largest share r of every group's channels (at least its minimum), floored onto the grid,
    predicted within the budget.

    Widths off the grid are outside what LPNet was fitted on (a fitted predictor put a tiny
    network at 0.4 of its widths, unrounded, at 6.2 ms and the same widths floored at 1.2 ms), so
    the search runs on grid widths; flooring is monotone in r, so bisection still applies.
    """
    lo, hi = 0.0, 1.0
    if problem.predicted_ms(uniform_widths(problem.grid, 1.0)) <= budget_ms:
        return 1.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if problem.predicted_ms(uniform_widths(problem.grid, mid)) <= budget_ms:
            lo = mid
        else:
            hi = mid
    return lo


def uniform_widths(grid: WidthGrid, ratio: float) -> list[int]:
    """`ratio` of every group's channels (at least its minimum), floored onto the grid."""
    return grid.floor([max(m, f * ratio) for f, m in zip(grid.full_widths, grid.min_widths, strict=True)])


def skew_bounds(ratio: float, max_skew: float | None) -> tuple[float, float]:
    """The keep ratios within `max_skew` of `ratio`, and pruned shares within it of 1 - `ratio`."""
    if max_skew is None:
        return 0.0, 1.0
    least = max(ratio / max_skew, 1.0 - (1.0 - ratio) * max_skew)
    most = min(ratio * max_skew, 1.0 - (1.0 - ratio) / max_skew, 1.0)
    return least, most


@dataclass(frozen=True)
class AllocationBand:
    """The band at one budget: per group, the fewest (`low`) and most (`high`) channels a plan keeps.

    Attributes:
        budget_ms: the (internal) budget the band was laid out for.
        uniform: the uniform keep ratio r at that budget (`uniform_ratio`).
        low_ratio, high_ratio: the band's keep ratios before rounding onto the grid (the minimum
            included in `low_ratio`).
        low, high: grid widths per group; `low` <= `high`.
        full: every group's channel count.
        movable: per group, whether the grid allows it more than one width (a group narrower than
            one step stays whole and says nothing about how even a plan is).
        policy: the policy the band comes from.
    """

    budget_ms: float
    uniform: float
    low_ratio: float
    high_ratio: float
    low: list[int]
    high: list[int]
    full: list[int]
    movable: list[bool]
    policy: AllocationPolicy

    @classmethod
    def at(cls, problem: PlanningProblem, budget_ms: float, policy: AllocationPolicy) -> AllocationBand:
        """The band around the uniform keep ratio at `budget_ms`."""
        return cls.around(problem, uniform_ratio(problem, budget_ms), policy, budget_ms)

    @classmethod
    def around(
        cls, problem: PlanningProblem, ratio: float, policy: AllocationPolicy, budget_ms: float = float("nan")
    ) -> AllocationBand:
        """The band around a uniform keep ratio `ratio`."""
        grid = problem.grid
        full, floor = grid.full_widths, grid.min_widths
        least, most = skew_bounds(ratio, policy.max_skew)
        uniform = uniform_widths(grid, ratio)
        # Rounded up, but never past the uniform width: the factor alone always admits uniform widths.
        skew_low = [min(c, u) for c, u in zip(grid.ceil([f * least for f in full]), uniform, strict=True)]
        if ratio >= policy.min_keep_ratio:
            minimum = grid.ceil([f * policy.min_keep_ratio for f in full])
            low_ratio = max(least, policy.min_keep_ratio)
        else:
            # The budget needs less than the minimum everywhere: no group under the uniform widths.
            minimum = uniform
            low_ratio = max(least, ratio)
        low = [max(m, s, k) for m, s, k in zip(floor, skew_low, minimum, strict=True)]
        high = [max(lo, hi) for lo, hi in zip(low, grid.floor([f * most for f in full]), strict=True)]
        movable = [len(grid.allowed(g)) > 1 for g in range(grid.num_groups)]
        return cls(budget_ms, ratio, low_ratio, most, low, high, full, movable, policy)

    @property
    def envelope(self) -> tuple[float, float]:
        """The smallest and largest keep ratio the band allows any movable group, on the grid."""
        lows = [lo / f for lo, f, free in zip(self.low, self.full, self.movable, strict=True) if free]
        highs = [hi / f for hi, f, free in zip(self.high, self.full, self.movable, strict=True) if free]
        return (min(lows), max(highs)) if lows else (1.0, 1.0)

    def clamp(self, target: Sequence[float]) -> list[float]:
        """`target` moved into the band."""
        return [float(max(lo, min(hi, t))) for t, lo, hi in zip(target, self.low, self.high, strict=True)]

    def outside(self, widths: Sequence[int]) -> list[int]:
        """The groups whose width is outside the band."""
        return [
            g
            for g, (w, lo, hi) in enumerate(zip(widths, self.low, self.high, strict=True))
            if not lo <= w <= hi
        ]

    def under_minimum(self, widths: Sequence[int]) -> list[int]:
        """The movable groups keeping less than `min_keep_ratio` of their channels."""
        minimum = self.policy.min_keep_ratio
        return [
            g
            for g, (w, f, free) in enumerate(zip(widths, self.full, self.movable, strict=True))
            if free and w < f * minimum - 1e-9
        ]

    def summary(self, widths: Sequence[int]) -> AllocationSummary:
        """How even `widths` are, and this band."""
        low, high = keep_ratio_spread(widths, self.full, self.movable)
        band_low, band_high = self.envelope
        return AllocationSummary(
            keep_ratio_min=low,
            keep_ratio_max=high,
            uniform_keep_ratio=self.uniform,
            band_low=band_low,
            band_high=band_high,
            max_skew=self.policy.max_skew,
            min_keep_ratio=self.policy.min_keep_ratio,
            groups_outside_band=self.outside(widths),
        )

    def warnings(self, widths: Sequence[int]) -> list[str]:
        """What a plan with `widths` must tell about leaving the band or the minimum, with the numbers."""
        notes: list[str] = []
        minimum = self.policy.min_keep_ratio
        under = self.under_minimum(widths) if self.uniform < minimum else []
        if under:
            notes.append(
                f"the {self.budget_ms:.3f} ms planned for needs a uniform keep ratio of {self.uniform:.3f}, "
                f"under min_keep_ratio {minimum:g}: {len(under)} group(s) keep less than {minimum:g} of "
                f"their channels ({self._listed(widths, under)}); raise the budget or lower min_keep_ratio"
            )
        outside = self.outside(widths)
        if outside:
            skew = "none" if self.policy.max_skew is None else f"{self.policy.max_skew:g}"
            notes.append(
                f"no plan inside the allocation band was predicted to meet the {self.budget_ms:.3f} ms "
                f"planned for: {len(outside)} group(s) leave it ({self._listed(widths, outside, edges=True)}); "
                f"the band keeps {self.low_ratio:.3f}-{self.high_ratio:.3f} of each group around the "
                f"uniform {self.uniform:.3f} (max_skew {skew}, min_keep_ratio {minimum:g}); raise the "
                "budget, or widen max_skew / lower min_keep_ratio"
            )
        return notes

    def _listed(self, widths: Sequence[int], groups: Sequence[int], edges: bool = False) -> str:
        parts = []
        for g in groups[:LISTED_GROUPS]:
            w, f = widths[g], self.full[g]
            text = f"group {g} keeps {w} of {f} channels ({w / f:.3f})"
            if edges:
                text += f", band {self.low[g]}-{self.high[g]}"
            parts.append(text)
        more = len(groups) - LISTED_GROUPS
        return "; ".join(parts) + (f"; {more} more" if more > 0 else "")


def keep_ratio_spread(
    widths: Sequence[int], full: Sequence[int], movable: Sequence[bool]
) -> tuple[float, float]:
    """The smallest and largest keep ratio among the movable groups (1, 1 when none can move)."""
    ratios = [w / f for w, f, free in zip(widths, full, movable, strict=True) if free]
    return (min(ratios), max(ratios)) if ratios else (1.0, 1.0)


def unbanded_summary(grid: WidthGrid, widths: Sequence[int]) -> AllocationSummary:
    """How even `widths` are, for a plan held to no band (the train mode's joint allocation)."""
    movable = [len(grid.allowed(g)) > 1 for g in range(grid.num_groups)]
    low, high = keep_ratio_spread(widths, grid.full_widths, movable)
    return AllocationSummary(keep_ratio_min=low, keep_ratio_max=high)


@dataclass
class BandedFit:
    """Grid widths near a target under a budget, inside the band at that budget, for one problem.

    Bands are kept per budget: a plan asks for the band of the budget it selected after planning for
    it, and the uniform ratio's search costs a few dozen predictor calls.
    """

    problem: PlanningProblem
    policy: AllocationPolicy
    _bands: dict[float, AllocationBand] = field(default_factory=dict)

    def band(self, budget_ms: float) -> AllocationBand:
        """The band at `budget_ms`."""
        if budget_ms not in self._bands:
            self._bands[budget_ms] = AllocationBand.at(self.problem, budget_ms, self.policy)
        return self._bands[budget_ms]

    def __call__(self, target: Sequence[float], budget_ms: float) -> list[int]:
        """Grid widths near `target` predicted at or under `budget_ms`, inside its band where possible.

        The target is clamped into the band, rounding adds channels back only up to the band's upper
        edge, and an over-budget target shrinks towards its lower edge (not towards the grid's
        minimum, from where rounding would add back the steps LPNet calls cheapest and rebuild a
        lopsided plan).

        LPNet is not monotone everywhere: it may predict the band's lower edge over a budget that
        wider groups elsewhere meet. When the target's shrink leaves the band, the plan starts again
        from the uniform widths (raised to the band's lower edge), which the uniform ratio's search
        found within the budget, and adds channels back from there. Only when that is over the
        budget too does the plan step under the band.
        """
        band = self.band(budget_ms)
        widths = self.problem.fit(band.clamp(target), budget_ms, band.high, band.low)
        if band.outside(widths):
            uniform = uniform_widths(self.problem.grid, band.uniform)
            start = [max(u, lo) for u, lo in zip(uniform, band.low, strict=True)]
            if self.problem.predicted_ms(start) <= budget_ms:
                widths = self.problem.fit(start, budget_ms, band.high, band.low)
        return widths
