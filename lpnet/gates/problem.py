"""Everything a plan needs about one network and one predictor, computed once: its channel groups, the
grid of widths they may take, and latency and capacity as functions of the widths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lpnet.arch.groups import ChannelLayout, channel_layout
from lpnet.arch.ir import Network
from lpnet.errors import NoPrunableGroups
from lpnet.gates.allocation import GRID_FLOOR_RATIO
from lpnet.gates.budget import WidthGrid, check_feasible, fit_widths_to_budget, predicted_latency, width_grid
from lpnet.gates.capacity import CapacityProxy
from lpnet.predictor.features import TensorizedNetwork, tensorize
from lpnet.predictor.predict import LatencyPredictor


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
