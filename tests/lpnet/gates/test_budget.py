"""The latency constraint, the width grid, and rounding that stays under the budget."""

from __future__ import annotations

import pytest
import torch

from lpnet.arch.groups import channel_layout
from lpnet.arch.ir import Network
from lpnet.errors import BudgetInfeasible
from lpnet.gates.budget import (
    AugmentedLagrangian,
    LatencyFn,
    WidthGrid,
    check_feasible,
    fit_widths_to_budget,
    predicted_latency,
    scale_to_budget,
    width_grid,
)
from lpnet.gates.capacity import CapacityProxy
from lpnet.predictor.features import tensorize
from lpnet.predictor.predict import LatencyPredictor


def test_grid_holds_multiples_of_round_to_above_the_minimum_and_the_full_width(tiny_net: Network) -> None:
    grid = width_grid(channel_layout(tiny_net), round_to=8, min_keep_ratio=0.2)
    assert grid.allowed(0) == [8, 16, 24, 32]
    assert grid.allowed(5) == list(range(32, 129, 8))  # 0.2 * 128 = 25.6 -> 32
    assert grid.floor([31.0, 7.0, 64.0, 63.9, 128.0, 40.0]) == [24, 8, 64, 56, 128, 40]
    coarse = width_grid(channel_layout(tiny_net), round_to=48, min_keep_ratio=0.0)
    assert coarse.allowed(0) == [32]  # narrower than one step: stays whole
    assert coarse.allowed(4) == [48, 96, 128]


def test_augmented_lagrangian_is_flat_inside_and_grows_outside() -> None:
    constraint = AugmentedLagrangian(budget_ms=10.0, rho=10.0, dual_rate=10.0)
    inside = torch.tensor(8.0, requires_grad=True)
    constraint.penalty(inside).backward()
    assert float(inside.grad) == 0.0
    outside = torch.tensor(12.0, requires_grad=True)
    constraint.penalty(outside).backward()
    assert float(outside.grad) > 0
    constraint.update(12.0)
    constraint.update(12.0)
    assert constraint.multiplier == pytest.approx(4.0)  # violation 0.2, rho 10, twice
    constraint.update(5.0)  # far inside: the multiplier decays to zero, never below
    assert constraint.multiplier == 0.0
    constraint.update(1e6)  # one wild prediction moves it by at most dual_rate
    assert constraint.multiplier == pytest.approx(10.0)


def test_equality_form_pulls_latency_up_to_the_budget() -> None:
    constraint = AugmentedLagrangian(budget_ms=10.0, rho=10.0, dual_rate=1.0, equality=True)
    inside = torch.tensor(8.0, requires_grad=True)
    constraint.penalty(inside).backward()
    assert float(inside.grad) < 0  # lowering the loss means raising latency towards the budget
    constraint.update(8.0)
    assert constraint.multiplier == pytest.approx(-0.2)


def latency_fn(network: Network, predictor: LatencyPredictor) -> LatencyFn:
    """The predictor's latency of width vectors (B, G) of `network`."""
    tn = tensorize(network)

    def latency(w: torch.Tensor) -> torch.Tensor:
        return predictor.latency(tn, w)

    return latency


def test_rounded_widths_fit_the_budget_and_no_single_step_up_does(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    layout = channel_layout(tiny_net)
    grid = width_grid(layout)
    latency = latency_fn(tiny_net, tiny_predictor)
    capacity = CapacityProxy(tiny_net, tensorize(tiny_net))
    full_ms = float(predicted_latency(latency, grid.full_widths)[0])
    for share in (0.5, 0.7, 0.9):
        budget = share * full_ms
        widths = fit_widths_to_budget([0.8 * c for c in grid.channels], grid, latency, capacity, budget)
        assert layout.validate(widths) == widths
        assert all(w % 8 == 0 for w in widths)
        assert float(predicted_latency(latency, widths)[0]) <= budget
        # On the low side of the staircase: every single step up crosses the budget.
        for g in range(grid.num_groups):
            up = grid.step_up(g, widths[g])
            if up is not None:
                bigger = [*widths[:g], up, *widths[g + 1 :]]
                assert float(predicted_latency(latency, bigger)[0]) > budget


def test_infeasible_budget_names_the_minimum_achievable_latency(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    grid = width_grid(channel_layout(tiny_net))
    latency = latency_fn(tiny_net, tiny_predictor)
    floor_ms = float(predicted_latency(latency, grid.min_widths)[0])
    assert check_feasible(grid, latency, floor_ms * 1.01) == pytest.approx(floor_ms)
    with pytest.raises(BudgetInfeasible) as info:
        check_feasible(grid, latency, floor_ms * 0.5)
    assert info.value.min_achievable_ms == pytest.approx(floor_ms)
    assert info.value.details["min_achievable_ms"] == pytest.approx(floor_ms)
    assert f"{floor_ms:.4g} ms" in info.value.message
    assert info.value.code == "budget_infeasible"


def test_an_over_budget_target_shrinks_as_a_whole_towards_the_minimum(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    grid = width_grid(channel_layout(tiny_net))
    latency = latency_fn(tiny_net, tiny_predictor)
    # A lopsided target: the first half of the groups full, the rest at their minimum.
    half = grid.num_groups // 2
    target = [float(c) for c in grid.channels[:half]] + [float(m) for m in grid.min_widths[half:]]
    target_ms = float(predicted_latency(latency, grid.floor(target))[0])
    min_ms = float(predicted_latency(latency, grid.min_widths)[0])
    assert min_ms < target_ms
    budget = (min_ms + target_ms) / 2
    widths, widths_ms = scale_to_budget(target, grid, latency, budget)
    assert widths_ms == pytest.approx(float(predicted_latency(latency, widths)[0]))
    assert widths_ms <= budget
    # The shape holds: groups the target kept at their minimum stay there; the others shrink from
    # the target's width but do not all collapse to the minimum.
    assert widths[half:] == grid.min_widths[half:]
    assert all(low <= w <= t for w, low, t in zip(widths, grid.min_widths, target, strict=True))
    assert widths != grid.min_widths


def test_an_over_budget_target_shrinks_towards_a_floor_when_given() -> None:
    # Latency proportional to the channel count (1 ms per 128), two groups of 64 on a grid of 8.
    grid = WidthGrid(channels=(64, 64), step=(8, 8), minimum=(8, 8))

    def latency(widths: torch.Tensor) -> torch.Tensor:
        return widths.sum(-1) / 128.0

    def capacity(widths: torch.Tensor) -> torch.Tensor:
        return torch.log(widths).sum(-1)

    budget = 96 / 128.0
    # Towards the grid's minimum, one common factor takes both groups to 48.
    assert scale_to_budget([64.0, 64.0], grid, latency, budget)[0] == [48, 48]
    # Towards a floor of (56, 8), the first group keeps at least 56.
    shrunk, shrunk_ms = scale_to_budget([64.0, 64.0], grid, latency, budget, floor=[56.0, 8.0])
    assert shrunk == [56, 40] and shrunk_ms == pytest.approx(budget)
    fitted = fit_widths_to_budget([64.0, 64.0], grid, latency, capacity, budget, floor=[56.0, 8.0])
    assert fitted[0] >= 56 and sum(fitted) <= 96
    # A floor over the budget by itself: the floor is where shrinking stops, and rounding steps
    # down from there until the widths fit.
    low = fit_widths_to_budget([64.0, 64.0], grid, latency, capacity, 0.5, floor=[64.0, 64.0])
    assert sum(low) <= 64
