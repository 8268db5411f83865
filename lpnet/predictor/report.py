"""Fit a predictor for a device and report how well it predicts networks it did not see."""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lpnet.predictor.baselines import NetworkLatencyModel
from lpnet.predictor.evaluate import LPNET_NAME, SplitResult, default_baselines, metrics_table, scatter_plot
from lpnet.predictor.model import INTERVAL_COVERAGE, LPNetConfig
from lpnet.predictor.predict import LatencyPredictor
from lpnet.predictor.samples import NetworkSample, samples_fingerprint
from lpnet.predictor.train import (
    MIN_NETWORK_SAMPLES,
    CrossFit,
    NotEnoughMeasurements,
    ProgressCallback,
    TrainConfig,
    fit_cross_validated,
)

logger = logging.getLogger(__name__)

# The largest share of the networks one member is fitted without (one fold of five).
HELD_OUT_SHARE = 0.2


def min_report_networks() -> int:
    """Measured networks a fit with its report needs: every member keeps at least
    MIN_NETWORK_SAMPLES after its fold is left out."""
    return int(MIN_NETWORK_SAMPLES / (1 - HELD_OUT_SHARE)) + 1


@dataclass
class FitReport:
    """A fitted predictor, its held-out metrics (beside the baselines) and a scatter plot."""

    predictor: LatencyPredictor
    metrics: dict[str, Any]
    scatter_png: bytes
    fingerprint: str


def fit_with_report(
    samples: Sequence[NetworkSample],
    config: LPNetConfig | None = None,
    train: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
    baselines: Sequence[Callable[[], NetworkLatencyModel]] | None = None,
) -> FitReport:
    """Fit the predictor on every network and report its accuracy, beside the baselines', on
    networks the predicting model never saw: one fit.

    Every network left out of a member's fit (a fold; `lpnet.predictor.train.fold_split`) is
    predicted by that member, and each baseline is fitted without the same fold and predicts it. The
    metrics describe models that never saw the networks they are judged on; the predictor returned
    is the whole ensemble.
    """
    need = min_report_networks()
    if len(samples) < need:
        raise NotEnoughMeasurements(
            f"fitting with a held-out evaluation needs about {need} measured networks; got {len(samples)}, "
            f"measure {need - len(samples)} more (lpnet profile)",
            {"have": len(samples), "need": need},
        )
    started = time.perf_counter()
    fit = fit_cross_validated(samples, config, train, progress)
    result = held_out_result(fit, samples, baselines)
    rows = metrics_table([result])
    buffer = io.BytesIO()
    scatter_plot(result, buffer)
    metrics = {
        "split": "cross-validated: each network predicted by the member fitted without its fold",
        "train_networks": len(samples),
        "test_networks": len(fit.held_out),
        "families": sorted({s.group for s in samples}),
        "fit_seconds": round(time.perf_counter() - started, 1),
        "lpnet": next(r for r in rows if r["model"] == LPNET_NAME),
        "baselines": [r for r in rows if r["model"] != LPNET_NAME],
        "baselines_not_fitted": result.skipped,
    }
    return FitReport(fit.predictor, metrics, buffer.getvalue(), samples_fingerprint(samples))


def held_out_result(
    fit: CrossFit,
    samples: Sequence[NetworkSample],
    baselines: Sequence[Callable[[], NetworkLatencyModel]] | None = None,
) -> SplitResult:
    """LPNet's and each baseline's predictions of the held-out networks, each by a model fitted
    without them.

    LPNet's interval for a held-out network is its member's prediction times and over
    exp(q), q the `INTERVAL_COVERAGE` quantile of the other calibration networks' errors (split
    conformal, without the network's own error): the predictor's own interval needs every member,
    and the others saw the network.
    """
    held = fit.held_out
    result = SplitResult(
        name="held-out folds",
        measured=np.array([samples[i].latency_ms for i in held]),
        families=[samples[i].group for i in held],
    )
    predicted = np.array(fit.held_out_ms)
    result.predictions[LPNET_NAME] = predicted
    half = _leave_one_out_quantiles(fit, held)
    result.intervals = (predicted * np.exp(-half), predicted * np.exp(half))
    folds: dict[int, list[int]] = {}
    for i, member in zip(held, fit.held_out_member, strict=True):
        folds.setdefault(member, []).append(i)
    for factory in baselines if baselines is not None else default_baselines():
        name, predictions = _cross_fitted_baseline(factory, samples, held, folds)
        if isinstance(predictions, str):
            logger.warning("baseline %s not fitted: %s", name, predictions)
            result.skipped[name] = predictions
        else:
            result.predictions[name] = predictions
    return result


def _leave_one_out_quantiles(fit: CrossFit, held: Sequence[int]) -> np.ndarray:
    residuals = fit.predictor.model.interval_residuals.numpy()
    position = {network: j for j, network in enumerate(fit.calibration)}
    out = []
    for i in held:
        others = np.delete(residuals, position[i]) if i in position else residuals
        n = len(others)
        if n == 0:
            out.append(math.inf)
            continue
        rank = min(n, math.ceil(INTERVAL_COVERAGE * (n + 1)))
        out.append(float(np.sort(others)[rank - 1]))
    return np.array(out)


def _cross_fitted_baseline(
    factory: Callable[[], NetworkLatencyModel],
    samples: Sequence[NetworkSample],
    held: Sequence[int],
    folds: dict[int, list[int]],
) -> tuple[str, np.ndarray | str]:
    """A baseline fitted without each fold and predicting it, in the order of `held`; or why it
    could not be fitted (a layer-level baseline on a profile without per-layer timings)."""
    predicted: dict[int, float] = {}
    name = factory().name
    for fold in folds.values():
        left_out = set(fold)
        model = factory()
        try:
            model.fit([s for i, s in enumerate(samples) if i not in left_out])
        except ValueError as exc:
            return name, str(exc)
        predicted |= dict(zip(fold, model.predict([samples[i].network for i in fold]), strict=True))
    return name, np.array([predicted[i] for i in held])
