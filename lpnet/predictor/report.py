"""Fit a predictor for a device and report how well it predicts networks it did not see."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lpnet.predictor.evaluate import LPNET_NAME, evaluate_split, held_out_split, metrics_table, scatter_plot
from lpnet.predictor.model import LPNetConfig
from lpnet.predictor.predict import LatencyPredictor
from lpnet.predictor.samples import NetworkSample, samples_fingerprint
from lpnet.predictor.train import (
    MIN_NETWORK_SAMPLES,
    NotEnoughMeasurements,
    ProgressCallback,
    TrainConfig,
    fit_predictor,
)

logger = logging.getLogger(__name__)


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
    test_share: float = 0.2,
) -> FitReport:
    """Fit LPNet on most architectures and evaluate it, and each baseline, on the rest; then fit
    the predictor returned on every network.

    The split is by architecture hash, never by row. The metrics describe the fitting procedure on
    networks it did not see; the predictor returned is the same procedure on all of them, so the
    networks held out for the report still inform the predictions a device answers with.
    """
    train_index, test_index = held_out_split(samples, test_share)
    if len(train_index) < MIN_NETWORK_SAMPLES or not test_index:
        need = int(MIN_NETWORK_SAMPLES / (1 - test_share)) + 1
        raise NotEnoughMeasurements(
            f"fitting with a held-out evaluation needs about {need} measured networks; got {len(samples)}, "
            f"measure {max(1, need - len(samples))} more (lpnet profile)",
            {"have": len(samples), "need": need},
        )
    started = time.perf_counter()

    def report_progress(done: int, total: int) -> None:  # the first of two fits of equal steps
        if progress is not None:
            progress(done, 2 * total)

    def final_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(total + done, 2 * total)

    result, _ = evaluate_split(
        "held-out architectures", samples, train_index, test_index, config, train, progress=report_progress
    )
    predictor = fit_predictor(samples, config, train, progress=final_progress)
    rows = metrics_table([result])
    buffer = io.BytesIO()
    scatter_plot(result, buffer)
    metrics = {
        "split": "held-out architectures (by hash)",
        "train_networks": len(train_index),
        "test_networks": len(test_index),
        "families": sorted({s.group for s in samples}),
        "fit_seconds": round(time.perf_counter() - started, 1),
        "lpnet": next(r for r in rows if r["model"] == LPNET_NAME),
        "baselines": [r for r in rows if r["model"] != LPNET_NAME],
        "baselines_not_fitted": result.skipped,
    }
    return FitReport(predictor, metrics, buffer.getvalue(), samples_fingerprint(samples))
