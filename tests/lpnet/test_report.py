"""A device fit's report: one cross-fitted fit, each network judged by models that never saw it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from lpnet.arch.generator import PROFILING_FAMILY
from lpnet.predictor.baselines import FlopsLinear
from lpnet.predictor.evaluate import LPNET_NAME
from lpnet.predictor.report import fit_with_report, held_out_result, min_report_networks
from lpnet.predictor.train import NotEnoughMeasurements, fit_cross_validated, fold_split
from tests.lpnet.law import QUICK, THREE, law_samples, member_totals


def test_every_network_is_judged_by_the_member_and_the_baselines_fitted_without_it() -> None:
    samples = law_samples(30, PROFILING_FAMILY)
    folds = fold_split([s.group for s in samples], 3, torch.Generator().manual_seed(QUICK.seed))
    # One network runs three times slower than the law: only the member that never saw it misses.
    odd = 7
    samples[odd] = dataclasses.replace(samples[odd], latency_ms=3 * samples[odd].latency_ms)
    fit = fit_cross_validated(samples, THREE, QUICK)
    assert fit.held_out == list(range(30))
    assert fit.held_out_member == folds
    for i, k in zip(fit.held_out, fit.held_out_member, strict=True):
        assert fit.held_out_ms[i] == pytest.approx(
            float(member_totals(fit.predictor.model, samples[i].network)[k])
        )
    held_out_ratio = fit.held_out_ms[odd] / samples[odd].latency_ms
    others = [fit.held_out_ms[i] / samples[i].latency_ms for i in range(30) if i != odd]
    assert held_out_ratio < 0.6 < min(others), (held_out_ratio, min(others))

    result = held_out_result(fit, samples, [FlopsLinear])
    assert result.predictions[LPNET_NAME].tolist() == fit.held_out_ms
    for k in range(3):
        fold = [i for i, f in enumerate(folds) if f == k]
        alone = FlopsLinear()
        alone.fit([s for i, s in enumerate(samples) if i not in fold])
        expected = alone.predict([samples[i].network for i in fold])
        assert result.predictions[FlopsLinear.name][fold] == pytest.approx(expected)
    # The odd network's interval is calibrated on the other networks' errors only: it misses.
    low, high = result.intervals or (np.zeros(0), np.zeros(0))
    assert not low[odd] <= samples[odd].latency_ms <= high[odd]
    assert math.isclose(
        float(np.log(high[odd] / fit.held_out_ms[odd])), float(np.log(fit.held_out_ms[odd] / low[odd]))
    )


def test_the_report_counts_every_network_and_refuses_too_few() -> None:
    samples = law_samples(min_report_networks(), PROFILING_FAMILY, seed=1)
    report = fit_with_report(samples, THREE, QUICK, baselines=[FlopsLinear])
    assert report.metrics["train_networks"] == report.metrics["test_networks"] == len(samples)
    assert [b["model"] for b in report.metrics["baselines"]] == [FlopsLinear.name]
    assert report.metrics["lpnet"]["count"] == len(samples)
    assert report.scatter_png.startswith(b"\x89PNG")
    with pytest.raises(NotEnoughMeasurements, match=f"needs about {min_report_networks()}"):
        fit_with_report(samples[:-1], THREE, QUICK, baselines=[FlopsLinear])
