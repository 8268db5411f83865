"""Accuracy metrics of latency predictions, as the latency-prediction literature reports them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class AccuracyMetrics:
    count: int
    within_5pct: float
    within_10pct: float
    rmspe: float
    mape: float
    spearman: float
    kendall: float
    interval_coverage: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def accuracy_metrics(
    predicted: np.ndarray,
    measured: np.ndarray,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
) -> AccuracyMetrics:
    """Shares within +-5 % / +-10 %, RMSPE and MAPE (fractions), rank correlations, interval coverage."""
    predicted = np.asarray(predicted, dtype=float)
    measured = np.asarray(measured, dtype=float)
    if predicted.shape != measured.shape or predicted.size == 0:
        raise ValueError(f"need equal, non-empty arrays; got {predicted.shape} and {measured.shape}")
    rel = (predicted - measured) / measured
    ranks_defined = predicted.size > 2 and np.ptp(predicted) > 0 and np.ptp(measured) > 0
    coverage = None
    if low is not None and high is not None:
        coverage = float(np.mean((np.asarray(low) <= measured) & (measured <= np.asarray(high))))
    return AccuracyMetrics(
        count=int(predicted.size),
        within_5pct=float(np.mean(np.abs(rel) <= 0.05)),
        within_10pct=float(np.mean(np.abs(rel) <= 0.10)),
        rmspe=float(np.sqrt(np.mean(rel**2))),
        mape=float(np.mean(np.abs(rel))),
        spearman=float(stats.spearmanr(predicted, measured).statistic) if ranks_defined else float("nan"),
        kendall=float(stats.kendalltau(predicted, measured).statistic) if ranks_defined else float("nan"),
        interval_coverage=coverage,
    )
