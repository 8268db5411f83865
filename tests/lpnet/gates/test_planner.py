"""Plans: architecture-only on resnet18, weights mode on the tiny net, verification by measurement."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence

import pytest
import torch

from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.arch.ir import Network
from lpnet.errors import BudgetInfeasible, InvalidPlanOptions, WeightsMismatch
from lpnet.gates.allocation import AllocationBand, AllocationPolicy, BandedFit, uniform_ratio, uniform_widths
from lpnet.gates.chart import layer_latency_chart
from lpnet.gates.datafree import DataFreeConfig
from lpnet.gates.options import FilterChoice, PlanMode
from lpnet.gates.planner import PlanOptions, plan
from lpnet.gates.problem import PlanningProblem
from lpnet.gates.result import PlanResult
from lpnet.measurement import MeasuredLatency
from lpnet.predictor.predict import LatencyPredictor
from lpnet.pruning import group_l1_scores, ir_state_dict, top_k_indices
from tests.lpnet.gates.conftest import Measure, tiny_module

QUICK_DATAFREE = DataFreeConfig(batch_size=4, synth_steps=10, gate_steps=40)


def test_architecture_only_plan_for_resnet18_predicts_under_budget(
    resnet18_small: Network, tiny_predictor: LatencyPredictor
) -> None:
    unpruned = tiny_predictor.predict(resnet18_small).total_ms
    budget = 0.6 * unpruned
    started = time.perf_counter()
    result = plan(resnet18_small, tiny_predictor, budget)
    assert time.perf_counter() - started < 10
    assert result.mode == "architecture-only"
    assert result.predicted.total_ms <= budget
    assert result.predicted.low_ms <= result.predicted.total_ms <= result.predicted.high_ms
    assert result.unpruned_predicted.total_ms == pytest.approx(unpruned)
    assert channel_layout(resnet18_small).validate(result.widths) == result.widths
    assert all(w % 8 == 0 for w in result.widths)
    assert result.pruned_network == apply_width_vector(resnet18_small, result.widths)
    assert result.cost_after.flops < result.cost_before.flops
    assert result.cost_after.params < result.cost_before.params
    assert result.kept_indices is None and result.met_budget is None and len(result.rounds) == 1
    data = json.loads(json.dumps(result.to_dict()))
    assert data["widths"] == result.widths
    assert data["groups"][0]["kept"] == result.widths[0]
    assert {layer["name"] for layer in data["layers"]} == {layer.name for layer in resnet18_small.layers}
    assert Network.from_dict(data["pruned_network"]).content_hash == result.pruned_network.content_hash


def test_the_gates_latency_steps_by_grid_secants(tiny_net: Network, tiny_predictor: LatencyPredictor) -> None:
    problem = PlanningProblem.build(tiny_net, tiny_predictor)
    grid = problem.grid
    # Off-grid continuous widths between the minimum and the full widths.
    continuous = [
        low + 0.37 * (full - low) + 1.3 for low, full in zip(grid.min_widths, grid.full_widths, strict=True)
    ]
    widths = torch.tensor([continuous], requires_grad=True)
    value = problem.step_latency(widths)
    snapped = problem.snap(widths.detach())
    # The value is the prediction at the nearest grid widths (members' geometric mean).
    with torch.no_grad():
        members = tiny_predictor.latency(problem.tn, snapped, members=True)
    assert float(value.detach()[0]) == pytest.approx(
        float(torch.exp(torch.log(members).mean(0))[0]), rel=1e-5
    )
    value.sum().backward()
    assert widths.grad is not None
    for g in range(grid.num_groups):
        at = [int(v) for v in snapped[0].tolist()]
        up = [*at[:g], grid.step_up(g, at[g]) or at[g], *at[g + 1 :]]
        down = [*at[:g], grid.step_down(g, at[g]) or at[g], *at[g + 1 :]]
        run = up[g] - down[g]
        with torch.no_grad():
            lat = problem.latency(torch.tensor([up, down], dtype=torch.float32))
        expected = float(lat[0] - lat[1]) / run if run else 0.0
        assert float(widths.grad[0, g]) == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_per_layer_chart_is_a_png(resnet18_small: Network, tiny_predictor: LatencyPredictor) -> None:
    result = plan(resnet18_small, tiny_predictor, 0.7 * tiny_predictor.predict(resnet18_small).total_ms)
    png = layer_latency_chart(result)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


@pytest.mark.parametrize("filters", list(FilterChoice))
def test_weights_plan_keeps_the_filters_its_option_names(
    filters: FilterChoice, tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    module = tiny_module()
    weights = ir_state_dict(module, tiny_net)
    budget = 0.6 * tiny_predictor.predict(tiny_net).total_ms
    options = PlanOptions(datafree=QUICK_DATAFREE, filters=filters)
    result = plan(tiny_net, tiny_predictor, budget, options, weights=weights)
    assert result.mode == "weights"
    assert result.predicted.total_ms <= budget
    norms = group_l1_scores(module, tiny_net)
    for group, group_norms in zip(result.groups, norms, strict=True):
        assert group.scores is not None and group.kept_indices is not None
        assert len(group.kept_indices) == group.kept
        assert group.kept_indices == top_k_indices(torch.tensor(group.scores), group.kept)
        # l1 keeps the largest filters by L1 norm; gates keeps the gates' own scores, which are not norms.
        is_l1 = torch.allclose(torch.tensor(group.scores), group_norms.float())
        assert is_l1 == (filters is FilterChoice.L1)


def test_an_unknown_filter_choice_is_named(tiny_net: Network, tiny_predictor: LatencyPredictor) -> None:
    weights = ir_state_dict(tiny_module(), tiny_net)
    options = PlanOptions(filters="best")  # type: ignore[arg-type]
    with pytest.raises(InvalidPlanOptions, match="filters must be one of l1, gates"):
        plan(tiny_net, tiny_predictor, 1.0, options, weights=weights)


def test_architecture_only_with_weights_keeps_the_largest_l1_filters(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    weights = ir_state_dict(tiny_module(), tiny_net)
    weights["stem.0.weight"][5] *= 100.0  # one filter of the first group becomes by far the largest
    budget = 0.5 * tiny_predictor.predict(tiny_net).total_ms
    options = PlanOptions(mode=PlanMode.ARCHITECTURE_ONLY)
    result = plan(tiny_net, tiny_predictor, budget, options, weights=weights)
    assert result.groups[0].kept_indices is not None and 5 in result.groups[0].kept_indices
    for group in result.groups:
        assert group.kept_indices == top_k_indices(torch.tensor(group.scores), group.kept)


def test_weights_that_do_not_fit_are_named(tiny_net: Network, tiny_predictor: LatencyPredictor) -> None:
    weights = ir_state_dict(tiny_module(), tiny_net)
    weights["blocks.1.conv1.weight"] = torch.zeros(64, 32, 5, 5)
    # A budget every plan meets (the unpruned prediction), whatever speed the predictor was fitted at.
    budget = tiny_predictor.predict(tiny_net).total_ms
    with pytest.raises(WeightsMismatch) as info:
        plan(tiny_net, tiny_predictor, budget, weights=weights)
    assert info.value.tensor == "blocks.1.conv1.weight"
    assert "[64, 32, 5, 5]" in info.value.message and "[64, 32, 3, 3]" in info.value.message
    del weights["blocks.1.conv1.weight"]
    with pytest.raises(WeightsMismatch, match="missing"):
        plan(tiny_net, tiny_predictor, budget, weights=weights)


def test_infeasible_budget_raises_with_the_minimum(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    with pytest.raises(BudgetInfeasible) as info:
        plan(tiny_net, tiny_predictor, 1e-3)
    floor_ms = info.value.min_achievable_ms
    assert 1e-3 < floor_ms < tiny_predictor.predict(tiny_net).total_ms
    result = plan(tiny_net, tiny_predictor, floor_ms * 1.001)
    assert result.min_achievable_ms == pytest.approx(floor_ms)
    assert result.predicted.total_ms <= floor_ms * 1.001


def test_plan_rejects_the_train_mode_and_weightless_weights_mode(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    with pytest.raises(InvalidPlanOptions, match="train_and_prune"):
        plan(tiny_net, tiny_predictor, 1.0, PlanOptions(mode=PlanMode.TRAIN))
    with pytest.raises(InvalidPlanOptions, match="weights"):
        plan(tiny_net, tiny_predictor, 1.0, PlanOptions(mode=PlanMode.WEIGHTS))


def test_verified_plan_measures_at_or_under_budget(
    tiny_net: Network, tiny_predictor: LatencyPredictor, measure: Measure
) -> None:
    budget = 0.7 * measure(tiny_net)
    calls: list[Network] = []

    def counting_measure(network: Network) -> float:
        calls.append(network)
        return measure(network)

    result = plan(tiny_net, tiny_predictor, budget, PlanOptions(), measure=counting_measure)
    assert result.verified and 1 <= len(result.rounds) <= PlanOptions().max_rounds
    # Plans timed over the budget once; plans that could end the loop twice, judged on the median.
    assert sum(len(r.timings_ms) for r in result.rounds) == len(calls)
    for round_ in result.rounds:
        first = round_.timings_ms[0]
        assert len(round_.timings_ms) == (2 if first <= budget else 1)
        assert round_.measured_ms == pytest.approx(sum(round_.timings_ms) / len(round_.timings_ms))
    assert result.met_budget is True
    assert result.measured_ms is not None and result.measured_ms <= budget
    assert [r.round for r in result.rounds] == list(range(1, len(result.rounds) + 1))
    assert result.rounds[0].internal_budget_ms == pytest.approx(budget)
    assert all(r.measured_ms is not None for r in result.rounds)
    [selected] = [r for r in result.rounds if r.selected]
    assert selected.widths == result.widths and selected.measured_ms == result.measured_ms
    assert apply_width_vector(tiny_net, result.widths).content_hash == result.pruned_network.content_hash
    # A round over the aim makes the next one plan tighter; one far under the budget, looser.
    options = PlanOptions()
    aim = budget * (1 - options.verify_margin)
    for before, after in zip(result.rounds, result.rounds[1:], strict=False):
        assert before.measured_ms is not None
        if before.measured_ms > aim:
            assert after.internal_budget_ms < before.internal_budget_ms
        elif before.measured_ms < budget * (1 - options.accept_band):
            assert after.internal_budget_ms > before.internal_budget_ms


def test_verification_judges_the_latency_at_nominal_speed_and_reports_the_raw_one(
    tiny_net: Network, tiny_predictor: LatencyPredictor, measure: Measure
) -> None:
    # Every measurement happens while the machine runs at half its nominal speed: the raw medians
    # are twice the latency at nominal speed, which is what the budget is judged against.
    budget = 0.7 * measure(tiny_net)

    def slow_moment(network: Network) -> MeasuredLatency:
        ms = measure(network)
        return MeasuredLatency(ms=ms, raw_ms=2 * ms, probe_ms=2.0, nominal_probe_ms=1.0)

    result = plan(tiny_net, tiny_predictor, budget, PlanOptions(), measure=slow_moment)
    assert result.met_budget is True
    assert result.measured_ms is not None and result.measured_ms <= budget
    for round_ in result.rounds:
        assert round_.measured_ms is not None and round_.measured_raw_ms is not None
        assert round_.measured_raw_ms == pytest.approx(2 * round_.measured_ms)
        assert (round_.probe_ms, round_.nominal_probe_ms) == (2.0, 1.0)
    payload = result.to_dict(include_network=False)["rounds"][0]
    assert {"measured_ms", "measured_raw_ms", "probe_ms", "nominal_probe_ms"} <= set(payload)


def test_a_lucky_first_timing_does_not_end_verification(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    # The device's latency is the prediction times a constant that puts the first plan at 0.99 of
    # the budget (over the aim), but every plan's first timing comes out 8 % fast: judged on that
    # timing alone, the first plan would be accepted under the aim while its real latency is over it.
    budget = 0.7 * tiny_predictor.predict(tiny_net).total_ms
    first_plan = plan(tiny_net, tiny_predictor, budget)  # the same first round, unmeasured
    scale = 0.99 * budget / first_plan.predicted.total_ms
    seen: dict[str, int] = {}

    def device(network: Network) -> float:
        true_ms = scale * tiny_predictor.predict(network).total_ms
        count = seen[network.content_hash] = seen.get(network.content_hash, 0) + 1
        return true_ms * (0.92 if count == 1 else 1.0)

    options = PlanOptions(max_rounds=4, verify_timings=3)
    result = plan(tiny_net, tiny_predictor, budget, options, measure=device)
    first = result.rounds[0]
    assert first.widths == first_plan.widths
    assert first.internal_budget_ms == pytest.approx(budget)
    assert first.timings_ms[0] <= budget and len(first.timings_ms) == 3
    # The median of (0.92 x, x, x) is x: the round is judged on the device's real latency.
    assert first.measured_ms == pytest.approx(scale * first.predicted_ms, rel=1e-6)
    assert first.measured_ms > budget * (1 - options.verify_margin)
    assert len(result.rounds) > 1 and result.rounds[1].internal_budget_ms < first.internal_budget_ms
    assert result.measured_ms is not None and result.measured_ms <= budget * (1 - options.verify_margin)


def test_verify_timings_must_be_positive(
    tiny_net: Network, tiny_predictor: LatencyPredictor, measure: Measure
) -> None:
    with pytest.raises(InvalidPlanOptions, match="verify_timings"):
        plan(tiny_net, tiny_predictor, 1.0, PlanOptions(verify_timings=0), measure=measure)


def test_repeated_timings_combine_field_by_field() -> None:
    timings = [
        MeasuredLatency(ms=10.0, raw_ms=20.0, probe_ms=2.0, nominal_probe_ms=1.0),
        MeasuredLatency(ms=12.0, raw_ms=18.0, probe_ms=1.5, nominal_probe_ms=1.0),
        MeasuredLatency(ms=11.0, raw_ms=30.0, probe_ms=2.5, nominal_probe_ms=1.0),
    ]
    combined = MeasuredLatency.median(timings)
    assert (combined.ms, combined.raw_ms, combined.probe_ms, combined.nominal_probe_ms) == (
        11.0,
        20.0,
        2.0,
        1.0,
    )
    unprobed = MeasuredLatency.median([MeasuredLatency.of(4.0), MeasuredLatency.of(6.0)])
    assert (unprobed.ms, unprobed.raw_ms, unprobed.probe_ms, unprobed.nominal_probe_ms) == (
        5.0,
        5.0,
        None,
        None,
    )
    with pytest.raises(ValueError, match="no timings"):
        MeasuredLatency.median([])


def test_a_timing_is_judged_at_the_nominal_speed_only_when_probed_and_a_nominal_is_known() -> None:
    def fields(m: MeasuredLatency) -> tuple[float, float, float | None, float | None]:
        return (m.ms, m.raw_ms, m.probe_ms, m.nominal_probe_ms)

    # 10 probe forwards long, judged where one probe forward takes 1.5 ms.
    assert fields(MeasuredLatency.at_speed(20.0, 10.0, 2.0, 1.5)) == (15.0, 20.0, 2.0, 1.5)
    assert fields(MeasuredLatency.at_speed(20.0, 10.0, 2.0, None)) == (20.0, 20.0, 2.0, None)
    assert fields(MeasuredLatency.at_speed(20.0, None, None, 1.5)) == (20.0, 20.0, None, None)


def test_a_plain_float_measurement_is_its_own_raw_median() -> None:
    measured = MeasuredLatency.of(3.5)
    assert (measured.ms, measured.raw_ms, measured.probe_ms, measured.nominal_probe_ms) == (
        3.5,
        3.5,
        None,
        None,
    )
    probed = MeasuredLatency(1.0, 2.0, 2.0, 1.0)
    assert MeasuredLatency.of(probed) is probed


def test_with_measurement_infeasibility_is_decided_by_the_device(
    tiny_net: Network, tiny_predictor: LatencyPredictor, measure: Measure
) -> None:
    with pytest.raises(BudgetInfeasible) as info:
        plan(tiny_net, tiny_predictor, 1e-3, measure=measure)
    assert info.value.details["measured"] is True
    assert info.value.min_achievable_ms > 1e-3
    assert "measures" in info.value.message


def test_planned_counts_stay_within_a_factor_of_the_uniform_ratio(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    problem = PlanningProblem.build(tiny_net, tiny_predictor)
    full, low = problem.grid.full_widths, problem.grid.min_widths
    # At 0.4 of every group's channels, so that 1.5 times the ratio stays under full width.
    budget = problem.predicted_ms(uniform_widths(problem.grid, 0.4))
    ratio = uniform_ratio(problem, budget)
    # The search runs on grid widths: off the grid LPNet is out of its domain.
    at = uniform_widths(problem.grid, ratio)
    above = uniform_widths(problem.grid, min(1.0, ratio * 1.05))
    assert 0.0 < ratio < 1.0
    assert problem.predicted_ms(at) <= budget
    assert above == at or problem.predicted_ms(above) > budget
    # A lopsided target: the first group at full width, every other at its minimum.
    lopsided = [float(full[0])] + [float(m) for m in low[1:]]
    policy = AllocationPolicy(max_skew=1.5, min_keep_ratio=0.05)
    band = AllocationBand.at(problem, budget, policy)
    bounded = band.clamp(lopsided)
    # Within a factor 1.5 of the uniform keep ratio, and of the uniform pruned share, on the grid: the
    # lower edge rounded up (never past the uniform width), the upper one rounded down.
    least = max(ratio / 1.5, 1.0 - (1.0 - ratio) * 1.5)
    most = min(ratio * 1.5, 1.0 - (1.0 - ratio) / 1.5)
    assert (band.low_ratio, band.high_ratio) == pytest.approx((least, most))
    edges = zip(band.low, band.high, full, low, at, problem.grid.step, strict=True)
    for g, (lo, hi, f, m, u, step) in enumerate(edges):
        # (The grid rounds with a tolerance of 1e-6 channels, as uniform_ratio's search needs.)
        assert lo == max(m, min(u, step * math.ceil((f * least - 1e-6) / step))), g
        assert hi == max(lo, min(f, step * math.floor((f * most + 1e-6) / step))), g
        assert lo <= bounded[g] <= hi
    assert bounded[0] < full[0] and bounded != lopsided
    # Rounding adds channels back only up to the band's ceiling, and stays within the budget.
    fitted = BandedFit(problem, policy)(lopsided, budget)
    assert problem.predicted_ms(fitted) <= budget
    assert band.outside(fitted) == [], (fitted, band.low, band.high)
    shrunk = problem.fit(bounded, budget, band.high, band.low)
    if band.outside(shrunk):
        # LPNet put the band's lower edge over the budget: the plan started from the uniform widths.
        assert all(w >= u for w, u in zip(fitted, at, strict=True)), (fitted, at)
    else:
        assert fitted == shrunk
    # No factor: only the minimum bounds the target.
    loose = AllocationBand.at(problem, budget, AllocationPolicy(max_skew=None, min_keep_ratio=0.05))
    assert loose.high == full and loose.low == low and loose.clamp(lopsided) == lopsided
    # A factor of 1 leaves no choice: the uniform widths, floored onto the grid.
    exact = AllocationPolicy(max_skew=1.0, min_keep_ratio=0.05)
    assert BandedFit(problem, exact)(lopsided, budget) == at


def test_at_mild_pruning_the_band_bounds_the_pruned_share_too(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    problem = PlanningProblem.build(tiny_net, tiny_predictor)
    full = problem.grid.full_widths
    ratio = 0.85
    band = AllocationBand.around(problem, ratio, AllocationPolicy(max_skew=1.25))
    # A factor of 1.25 on the keep ratio alone would admit ratio / 1.25 (about 0.68 of a group);
    # the pruned share may grow only to 1.25 times uniform's, and shrink to 1 / 1.25 of it.
    assert band.low_ratio == pytest.approx(1.0 - (1.0 - ratio) * 1.25)
    assert band.high_ratio == pytest.approx(1.0 - (1.0 - ratio) / 1.25)
    assert ratio / 1.25 < band.low_ratio < ratio < band.high_ratio < 1.0
    for f, lo, hi in zip(full, band.low, band.high, strict=True):
        assert f * ratio / 1.25 < lo <= hi < f
        assert hi <= f * band.high_ratio
    # A lopsided target (first group at full width, the rest at their minimum) is pulled to both edges.
    lopsided = [float(full[0])] + [float(m) for m in problem.grid.min_widths[1:]]
    clamped = band.clamp(lopsided)
    assert clamped[0] == band.high[0] and clamped[1:] == band.low[1:]


def test_allocation_options_are_checked(tiny_net: Network, tiny_predictor: LatencyPredictor) -> None:
    budget = tiny_predictor.predict(tiny_net).total_ms
    for options, words in (
        (PlanOptions(max_skew=0.8), "max_skew must be at least 1"),
        (PlanOptions(max_skew=float("inf")), "max_skew must be at least 1"),
        (PlanOptions(min_keep_ratio=0.0), "min_keep_ratio must be in (0, 1]"),
        (PlanOptions(min_keep_ratio=1.5), "min_keep_ratio must be in (0, 1]"),
    ):
        with pytest.raises(InvalidPlanOptions) as info:
            plan(tiny_net, tiny_predictor, budget, options)
        assert words in info.value.message


def assert_within_band(result: PlanResult, band: AllocationBand, steps: Sequence[int]) -> None:
    """The plan's widths are inside `band`, it does not warn about it, and it reports it as it is."""
    assert band.outside(result.widths) == [], (result.widths, band.low, band.high)
    assert band.under_minimum(result.widths) == []
    assert not any("band" in w or "min_keep_ratio" in w for w in result.warnings), result.warnings
    summary = result.allocation
    assert summary is not None and summary.groups_outside_band == []
    ratios = [w / f for w, f, free in zip(result.widths, band.full, band.movable, strict=True) if free]
    assert (summary.keep_ratio_min, summary.keep_ratio_max) == (min(ratios), max(ratios))
    assert summary.keep_ratio_min >= band.policy.min_keep_ratio - 1e-9
    # The band reported is what the grid allows: the spread lies inside it.
    assert (summary.band_low, summary.band_high) == band.envelope
    assert summary.band_low <= summary.keep_ratio_min <= summary.keep_ratio_max <= summary.band_high
    assert (summary.max_skew, summary.min_keep_ratio) == (band.policy.max_skew, band.policy.min_keep_ratio)
    assert summary.uniform_keep_ratio == band.uniform
    # The spread stays within the band's keep ratios, up to rounding onto the grid (one step each way).
    for w, f, step, free in zip(result.widths, band.full, steps, band.movable, strict=True):
        if free:
            assert band.low_ratio - step / f - 1e-6 <= w / f <= band.high_ratio + 1e-6, (w, f, band)


@pytest.mark.parametrize("share", [0.5, 0.7, 0.9])
def test_architecture_plans_stay_within_the_band(
    resnet18_small: Network, tiny_predictor: LatencyPredictor, share: float
) -> None:
    problem = PlanningProblem.build(resnet18_small, tiny_predictor)
    budget = share * tiny_predictor.predict(resnet18_small).total_ms
    result = plan(resnet18_small, tiny_predictor, budget)
    assert result.predicted.total_ms <= budget
    band = AllocationBand.at(problem, budget, AllocationPolicy())
    assert band.uniform >= AllocationPolicy().min_keep_ratio  # the minimum holds at these budgets
    assert_within_band(result, band, problem.grid.step)
    payload = json.loads(json.dumps(result.to_dict(include_network=False)))["allocation"]
    assert payload["keep_ratio_min"] == result.allocation.keep_ratio_min  # type: ignore[union-attr]
    assert payload["band_high"] == band.envelope[1] and payload["max_skew"] == 1.25


def test_widening_the_band_changes_what_a_plan_may_do(
    resnet18_small: Network, tiny_predictor: LatencyPredictor
) -> None:
    problem = PlanningProblem.build(resnet18_small, tiny_predictor)
    budget = 0.5 * tiny_predictor.predict(resnet18_small).total_ms
    default = AllocationBand.at(problem, budget, AllocationPolicy())
    wide_policy = AllocationPolicy(max_skew=2.0, min_keep_ratio=0.1)
    wide = AllocationBand.at(problem, budget, wide_policy)
    assert wide.low_ratio < default.low_ratio and wide.high_ratio > default.high_ratio
    # Unbounded, the capacity proxy's optimum is lopsided: it leaves the default band.
    free = plan(resnet18_small, tiny_predictor, budget, PlanOptions(max_skew=None, min_keep_ratio=0.05))
    assert (
        free.allocation is not None and free.allocation.band_high == 1.0 and free.allocation.max_skew is None
    )
    assert default.outside(free.widths), (free.widths, default.low, default.high)
    # With the wider band the plan goes where the default band would not let it, and stays in its own.
    widened = plan(resnet18_small, tiny_predictor, budget, PlanOptions(max_skew=2.0, min_keep_ratio=0.1))
    assert_within_band(widened, wide, problem.grid.step)
    assert default.outside(widened.widths), (widened.widths, default.low, default.high)
    assert widened.allocation is not None and widened.allocation.max_skew == 2.0


def test_weights_plans_stay_within_the_band(tiny_net: Network, tiny_predictor: LatencyPredictor) -> None:
    problem = PlanningProblem.build(tiny_net, tiny_predictor)
    weights = ir_state_dict(tiny_module(), tiny_net)
    for share in (0.5, 0.7):
        budget = share * tiny_predictor.predict(tiny_net).total_ms
        result = plan(tiny_net, tiny_predictor, budget, PlanOptions(datafree=QUICK_DATAFREE), weights=weights)
        assert result.mode == "weights" and result.predicted.total_ms <= budget
        assert_within_band(result, AllocationBand.at(problem, budget, AllocationPolicy()), problem.grid.step)


def test_a_budget_under_the_minimum_keeps_uniform_widths_and_warns(
    resnet18_small: Network, tiny_predictor: LatencyPredictor
) -> None:
    problem = PlanningProblem.build(resnet18_small, tiny_predictor)
    budget = 0.5 * tiny_predictor.predict(resnet18_small).total_ms
    ratio = uniform_ratio(problem, budget)
    minimum = min(1.0, round(ratio + 0.2, 2))  # more than the budget allows every group
    result = plan(resnet18_small, tiny_predictor, budget, PlanOptions(min_keep_ratio=minimum))
    assert result.predicted.total_ms <= budget
    [warning] = [w for w in result.warnings if "min_keep_ratio" in w]
    assert f"uniform keep ratio of {ratio:.3f}, under min_keep_ratio {minimum:g}" in warning
    # The minimum gives way to the uniform widths, never further: no group under them.
    uniform = uniform_widths(problem.grid, ratio)
    assert all(w >= u for w, u in zip(result.widths, uniform, strict=True)), (result.widths, uniform)
    band = AllocationBand.at(problem, budget, AllocationPolicy(min_keep_ratio=minimum))
    under = band.under_minimum(result.widths)
    assert under and f"{len(under)} group(s) keep less than {minimum:g}" in warning
    g = under[0]
    assert f"group {g} keeps {result.widths[g]} of {band.full[g]} channels" in warning


def test_a_plan_that_must_leave_the_band_says_so(
    resnet18_small: Network, tiny_predictor: LatencyPredictor
) -> None:
    problem = PlanningProblem.build(resnet18_small, tiny_predictor)
    # Uniform widths only, and a minimum just under the uniform ratio, rounded up onto the grid: the
    # band holds one width vector, a step above the uniform widths in the groups whose uniform share
    # is off the grid. Whether that vector is over the budget depends on the fitted predictor's
    # staircase, so the test takes the first of several budgets where it is.
    unpruned_ms = tiny_predictor.predict(resnet18_small).total_ms
    for share in (0.6, 0.5, 0.7, 0.55, 0.65, 0.45, 0.75):
        budget = share * unpruned_ms
        ratio = uniform_ratio(problem, budget)
        policy = AllocationPolicy(max_skew=1.0, min_keep_ratio=ratio * 0.999)
        band = AllocationBand.at(problem, budget, policy)
        assert band.low == band.high
        if problem.predicted_ms(band.low) > budget:
            break
    else:
        pytest.fail("at no budget was the band's only width vector over the budget")
    options = PlanOptions(max_skew=1.0, min_keep_ratio=policy.min_keep_ratio)
    result = plan(resnet18_small, tiny_predictor, budget, options)
    assert result.predicted.total_ms <= budget
    outside = band.outside(result.widths)
    assert outside and result.allocation is not None and result.allocation.groups_outside_band == outside
    [warning] = [w for w in result.warnings if "allocation band" in w]
    assert f"{len(outside)} group(s) leave it" in warning
    g = outside[0]
    assert f"group {g} keeps {result.widths[g]} of {band.full[g]} channels" in warning
    assert f"band {band.low[g]}-{band.high[g]}" in warning
    assert f"around the uniform {ratio:.3f} (max_skew 1, min_keep_ratio {policy.min_keep_ratio:g})" in warning


def test_verified_plans_stay_within_the_band_of_the_budget_they_planned_for(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    problem = PlanningProblem.build(tiny_net, tiny_predictor)
    budget = 0.6 * tiny_predictor.predict(tiny_net).total_ms

    def device(network: Network) -> float:
        # 30 % faster than LPNet predicts: verification loosens the internal budget round by round.
        return 0.7 * tiny_predictor.predict(network).total_ms

    result = plan(tiny_net, tiny_predictor, budget, PlanOptions(max_rounds=4), measure=device)
    assert (
        len(result.rounds) >= 2 and result.rounds[1].internal_budget_ms > result.rounds[0].internal_budget_ms
    )
    for round_ in result.rounds:
        band = AllocationBand.at(problem, round_.internal_budget_ms, AllocationPolicy())
        assert band.outside(round_.widths) == [], (round_.round, round_.widths, band.low, band.high)
    [selected] = [r for r in result.rounds if r.selected]
    reported = AllocationBand.at(problem, selected.internal_budget_ms, AllocationPolicy())
    assert_within_band(result, reported, problem.grid.step)
