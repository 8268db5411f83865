"""LPNet's cross-validated fit and its cross-validation+ interval, on networks whose latencies follow a
known law (no timing: what is tested is which member saw which network, and the interval's arithmetic)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lpnet.arch.generator import PROFILING_FAMILY
from lpnet.predictor.artifact import dump_predictor, load_predictor, read_header
from lpnet.predictor.model import INTERVAL_COVERAGE, LPNet, LPNetConfig, member_log_spread
from lpnet.predictor.train import fit_predictor, fold_split
from tests.lpnet.law import QUICK, THREE, law_samples, member_totals


def test_folds_keep_small_architectures_whole_and_spread_a_large_family() -> None:
    groups = [f"arch-{i // 2}" for i in range(40)] + ["family"] * 60
    folds = fold_split(groups, 5, torch.Generator().manual_seed(3))
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    for g in set(groups) - {"family"}:
        assert len({f for f, h in zip(folds, groups, strict=True) if h == g}) == 1, g
    family_folds = [f for f, g in zip(folds, groups, strict=True) if g == "family"]
    assert sorted(set(family_folds)) == [0, 1, 2, 3, 4]
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 2, sizes
    assert folds == fold_split(groups, 5, torch.Generator().manual_seed(3))


def test_each_member_never_sees_its_fold_and_its_error_there_calibrates_the_interval() -> None:
    samples = law_samples(30, PROFILING_FAMILY)
    groups = [s.group for s in samples]
    assert len(set(groups)) == 30  # every network an architecture of its own
    predictor = fit_predictor(samples, THREE, QUICK)
    folds = fold_split(groups, 3, torch.Generator().manual_seed(QUICK.seed))
    model = predictor.model
    # One residual per network, under the member whose fold it is: the member's absolute log error.
    assert model.interval_member.tolist() == sorted(folds)
    for k in range(3):
        fold = [s for s, f in zip(samples, folds, strict=True) if f == k]
        errors = sorted(abs(math.log(float(member_totals(model, s.network)[k]) / s.latency_ms)) for s in fold)
        stored = sorted(model.interval_residuals[model.interval_member == k].tolist())
        assert stored == pytest.approx(errors, rel=1e-4, abs=1e-6)
    # Tripling the latencies of fold 0 changes the members that fitted it, and not member 0.
    changed = [
        dataclasses.replace(s, latency_ms=3 * s.latency_ms) if f == 0 else s
        for s, f in zip(samples, folds, strict=True)
    ]
    other = fit_predictor(changed, THREE, QUICK).model
    assert torch.equal(other.members[0].head.weight, model.members[0].head.weight)
    assert not torch.equal(other.members[1].head.weight, model.members[1].head.weight)
    assert not torch.equal(other.members[2].head.weight, model.members[2].head.weight)


def test_width_variants_of_one_family_calibrate_on_the_variants_left_out() -> None:
    # No architecture is ever left out whole, so every left-out variant calibrates.
    samples = law_samples(24, "family")
    model = fit_predictor(samples, THREE, QUICK).model
    assert model.interval_residuals.numel() == 24


def test_the_interval_applies_every_calibration_error_to_its_own_member() -> None:
    model = LPNet(LPNetConfig(members=3))
    residuals = torch.tensor(np.random.default_rng(1).uniform(0.0, 0.3, 60), dtype=torch.float32)
    model.set_interval_residuals(residuals, torch.arange(60) % 3)
    rank = math.ceil(INTERVAL_COVERAGE * 61)
    q = float(residuals.sort().values[rank - 1])
    # Members that agree: the interval is their total times exp(-q) to exp(q), q the residuals'
    # quantile.
    low, high = model.interval_bounds(torch.full((3, 1), 10.0))
    assert float(high[0]) == pytest.approx(10.0 * math.exp(q), rel=1e-5)
    assert float(low[0]) == pytest.approx(10.0 * math.exp(-q), rel=1e-5)
    # One member far above the others: the interval reaches further up; its low end, now set by
    # fewer low values, rises a little but stays below the two members that agree.
    low_apart, high_apart = model.interval_bounds(torch.tensor([[10.0], [10.0], [20.0]]))
    assert float(high_apart[0]) > float(high[0]) * 1.3
    assert float(low[0]) <= float(low_apart[0]) < 10.0 * math.exp(-q / 2)


def test_a_version_5_artifact_keeps_its_scaled_spread_interval() -> None:
    predictor = fit_predictor(law_samples(24, PROFILING_FAMILY), THREE, QUICK)
    data = dump_predictor(predictor)
    tensors = {k: v for k, v in load_tensors(data).items() if not k.startswith("model.interval_residuals")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.interval_member")}
    old = load_predictor(save_tensors(tensors, metadata={**read_header(data), "artifact_version": "5"}))
    assert old.model.interval_residuals.numel() == 0
    network = law_samples(1, PROFILING_FAMILY, seed=9)[0].network
    totals = member_totals(old.model, network)[:, None]
    half = float(old.model.interval_scale * (member_log_spread(totals)[0] + old.model.interval_floor))
    prediction = old.predict(network)
    assert math.log(prediction.high_ms / prediction.total_ms) == pytest.approx(half, rel=1e-4)
    current = load_predictor(data)
    assert current.predict(network).high_ms == predictor.predict(network).high_ms
