from __future__ import annotations

import pytest

from profiler.batch import MeasurementKind
from profiler.budget import GENERATED_SHARE, BudgetPlanner
from profiler.family_names import GENERATED_FAMILY, TRANSFORMER_FAMILY

NET, CTX, ISO = MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT, MeasurementKind.ISOLATED
BUCKETS = [("a", NET), ("b", NET), ("a", CTX), ("a", ISO), ("b", ISO)]
SHARES = {NET: 0.6, CTX: 0.15, ISO: 0.25}


def test_shares_split_kinds_evenly_over_families() -> None:
    planner = BudgetPlanner(BUCKETS, 600.0, kind_shares=SHARES)
    assert sum(planner.shares.values()) == pytest.approx(1.0)
    assert planner.shares[("a", NET)] == pytest.approx(0.3)
    assert planner.shares[("a", CTX)] == pytest.approx(0.15)
    assert planner.shares[("b", ISO)] == pytest.approx(0.125)


def test_generated_streams_take_their_share_of_each_kind_beside_named_families() -> None:
    buckets = [("r18", NET), ("r50", NET), ("mv2", NET), (GENERATED_FAMILY, NET), ("r18", CTX)]
    planner = BudgetPlanner(buckets, 600.0, kind_shares=SHARES)
    assert sum(planner.shares.values()) == pytest.approx(1.0)
    net = SHARES[NET] / (SHARES[NET] + SHARES[CTX])
    assert planner.shares[(GENERATED_FAMILY, NET)] == pytest.approx(net * GENERATED_SHARE)
    assert planner.shares[("r50", NET)] == pytest.approx(net * (1 - GENERATED_SHARE) / 3)
    # A kind without generated buckets splits evenly.
    assert planner.shares[("r18", CTX)] == pytest.approx(1 - net)
    # Two generated streams split the generated share.
    both = BudgetPlanner([("r18", NET), (GENERATED_FAMILY, NET), (TRANSFORMER_FAMILY, NET)], 60.0)
    assert both.shares[(TRANSFORMER_FAMILY, NET)] == pytest.approx(GENERATED_SHARE / 2)
    assert both.shares[("r18", NET)] == pytest.approx(1 - GENERATED_SHARE)


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
