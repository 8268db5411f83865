"""Plan options declared once (`lpnet.gates.options`): bounds in words and in checks, the options classes
declared from the specs, and the modes as plan requests name them."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest

from lpnet.errors import InvalidPlanOptions
from lpnet.gates.allocation import AllocationPolicy
from lpnet.gates.options import (
    FINETUNE_EPOCHS,
    MAX_BATCHES,
    MAX_SKEW,
    MIN_KEEP_RATIO,
    ROUND_TO,
    SAFETY_MARGIN,
    SEED,
    SPEC_KEY,
    TRAIN_LEARNING_RATE,
    Allocation,
    ModeName,
    PlanMode,
    option_specs,
)
from lpnet.gates.planner import PlanOptions
from lpnet.gates.training import TrainPruneConfig


def test_bounds_read_as_words_and_refuse_what_lies_outside() -> None:
    assert ROUND_TO.span() == "in [1, 256]"
    assert MIN_KEEP_RATIO.span() == "in (0, 1]"
    assert SAFETY_MARGIN.span() == "in [0, 1)"
    assert MAX_SKEW.span() == "at least 1"
    assert TRAIN_LEARNING_RATE.span() == "greater than 0"
    assert FINETUNE_EPOCHS.problem(0) is None and FINETUNE_EPOCHS.problem(-1) == "must be at least 0"
    assert ROUND_TO.problem(256) is None and ROUND_TO.problem(257) == "must be in [1, 256]"
    assert ROUND_TO.problem(True) == "must be a number in [1, 256]"
    assert MIN_KEEP_RATIO.problem(1.0) is None and MIN_KEEP_RATIO.problem(0.0) == "must be in (0, 1]"
    assert MAX_SKEW.problem(float("inf")) == "must be at least 1 and finite"
    assert MIN_KEEP_RATIO.problem(float("nan")) == "must be in (0, 1] and finite"
    # None is a value only where the option says so; an unbounded option takes any number.
    assert MAX_SKEW.problem(None) is None and MAX_BATCHES.problem(None) is None
    assert MIN_KEEP_RATIO.problem(None) == "must be given"
    assert SEED.problem(-7) is None
    with pytest.raises(InvalidPlanOptions) as info:
        MAX_SKEW.check(0.5)
    assert info.value.message == "max_skew must be at least 1, got 0.5"
    assert info.value.details == {"max_skew": 0.5}


def test_options_classes_take_their_defaults_from_the_specs_and_check_them() -> None:
    for options in (PlanOptions, TrainPruneConfig, AllocationPolicy):
        declared = [f for f in dataclasses.fields(options) if SPEC_KEY in f.metadata]
        assert declared, options
        for field in declared:
            spec = field.metadata[SPEC_KEY]
            assert (field.name, field.default) == (spec.name, spec.default)
    assert {spec.name for spec in option_specs(PlanOptions)} >= {"round_to", "max_skew", "safety_margin"}
    PlanOptions().check()
    TrainPruneConfig().check()
    for options, message in (
        (PlanOptions(round_to=512), "round_to must be in [1, 256], got 512"),
        (PlanOptions(verify_timings=0), "verify_timings must be at least 1, got 0"),
        (PlanOptions(safety_margin=1.0), "safety_margin must be in [0, 1), got 1.0"),
        (TrainPruneConfig(gate_epochs=0), "gate_epochs must be at least 1, got 0"),
        (TrainPruneConfig(learning_rate=0.0), "learning_rate must be greater than 0, got 0.0"),
        (TrainPruneConfig(max_batches=0), "max_batches must be at least 1, got 0"),
    ):
        with pytest.raises(InvalidPlanOptions) as info:
            options.check()
        assert info.value.message == message
    with pytest.raises(InvalidPlanOptions, match=r"min_keep_ratio must be in \(0, 1\], got 1.5"):
        AllocationPolicy(min_keep_ratio=1.5)


def test_the_train_modes_allocation_is_one_of_its_names() -> None:
    assert TrainPruneConfig().checked_allocation() is Allocation.PLANNED
    joint = TrainPruneConfig(allocation="joint")  # type: ignore[arg-type]
    assert joint.checked_allocation() is Allocation.JOINT
    with pytest.raises(ValueError, match=r"allocation must be one of \['joint', 'planned'\], got 'x'"):
        TrainPruneConfig(allocation="x").checked_allocation()  # type: ignore[arg-type]


def test_the_modes_requests_name_are_the_planners_modes_but_train() -> None:
    # A plan request cannot carry a dataset, so the train mode is the library's and `lpnet train`'s only.
    assert {PlanMode.named(name) for name in get_args(ModeName)} == set(PlanMode) - {PlanMode.TRAIN}
    assert "train" not in get_args(ModeName) and PlanMode.named("train") is PlanMode.TRAIN
    assert PlanMode.named("architecture") is PlanMode.ARCHITECTURE_ONLY
    assert PlanMode.named("architecture-only") is PlanMode.ARCHITECTURE_ONLY
    assert PlanMode.named(PlanMode.WEIGHTS) is PlanMode.WEIGHTS
    with pytest.raises(
        InvalidPlanOptions, match="unknown plan mode 'fast'; use one of architecture-only, weights$"
    ):
        PlanMode.named("fast")
