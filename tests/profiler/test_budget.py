from __future__ import annotations

import pytest

from profiler.batch import MeasurementKind
from profiler.budget import BudgetPlanner

NET, CTX, ISO = MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT, MeasurementKind.ISOLATED
BUCKETS = [("a", NET), ("b", NET), ("a", CTX), ("a", ISO), ("b", ISO)]
SHARES = {NET: 0.6, CTX: 0.15, ISO: 0.25}


def test_shares_split_kinds_evenly_over_families() -> None:
    planner = BudgetPlanner(BUCKETS, 600.0, kind_shares=SHARES)
    assert sum(planner.shares.values()) == pytest.approx(1.0)
    assert planner.shares[("a", NET)] == pytest.approx(0.3)
    assert planner.shares[("a", CTX)] == pytest.approx(0.15)
    assert planner.shares[("b", ISO)] == pytest.approx(0.125)


def test_time_follows_the_shares_and_flows_to_others_when_a_bucket_is_dry() -> None:
    planner = BudgetPlanner(BUCKETS, 1000.0, kind_shares=SHARES)
    cost = {NET: 4.0, CTX: 8.0, ISO: 1.0}
    spent: dict[tuple[str, MeasurementKind], float] = {}
    while (bucket := planner.next_bucket()) is not None:
        planner.record(bucket, cost[bucket[1]])
        spent[bucket] = spent.get(bucket, 0.0) + cost[bucket[1]]
        if bucket == ("a", CTX) and spent[bucket] >= 40:
            planner.exhaust(bucket)  # its sampler ran dry
    assert planner.spent_seconds <= 1000.0 + max(cost.values())
    assert planner.spent_seconds >= 1000.0 - max(cost.values())
    # The dry bucket's unused share went to the others, in proportion.
    assert spent[("a", CTX)] == pytest.approx(40, abs=8)
    assert spent[("a", NET)] == pytest.approx(spent[("b", NET)], abs=8)
    assert spent[("a", NET)] / spent[("a", ISO)] == pytest.approx(0.3 / 0.125, rel=0.1)


def test_cost_estimate_uses_running_average_then_kind_then_prior() -> None:
    planner = BudgetPlanner(BUCKETS, 100.0)
    prior = planner.cost_estimate(("b", NET))
    planner.record(("a", NET), 2.0)
    planner.record(("a", NET), 4.0)
    assert planner.cost_estimate(("a", NET)) == 3.0
    assert planner.cost_estimate(("b", NET)) == 3.0 != prior
    remaining = planner.estimated_remaining_samples()
    assert remaining is not None and remaining > 0


def test_no_budget_interleaves_until_every_bucket_is_dry() -> None:
    planner = BudgetPlanner.from_minutes(BUCKETS, None)
    assert planner.estimated_remaining_samples() is None
    for bucket in BUCKETS:
        planner.exhaust(bucket)
    assert planner.next_bucket() is None


def test_a_sample_too_expensive_for_what_is_left_is_not_started() -> None:
    planner = BudgetPlanner([("a", NET)], 10.0)
    planner.record(("a", NET), 8.0)
    assert planner.next_bucket() is None  # another 8 s would overshoot 2 s left by far


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        BudgetPlanner(BUCKETS, 0.0)
