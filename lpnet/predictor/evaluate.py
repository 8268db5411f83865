"""Evaluation by architecture, never by row: held-out width configurations, and leave-one-family-out."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lpnet.predictor.baselines import FlopsLinear, LayerForestSum, LayerLookupSum, NetworkLatencyModel
from lpnet.predictor.metrics import AccuracyMetrics, accuracy_metrics
from lpnet.predictor.model import LPNetConfig
from lpnet.predictor.predict import LatencyPredictor
from lpnet.predictor.samples import NetworkSample
from lpnet.predictor.train import ProgressCallback, TrainConfig, fit_predictor

logger = logging.getLogger(__name__)

LPNET_NAME = "LPNet"


@dataclass
class SplitResult:
    """Predictions of every model on one test split."""

    name: str
    measured: np.ndarray
    families: list[str]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    intervals: tuple[np.ndarray, np.ndarray] | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # baseline -> why it could not be fitted

    def metrics(self) -> dict[str, AccuracyMetrics]:
        out = {}
        for model, predicted in self.predictions.items():
            low, high = self.intervals if (model == LPNET_NAME and self.intervals) else (None, None)
            out[model] = accuracy_metrics(predicted, self.measured, low, high)
        return out


def held_out_split(samples: Sequence[NetworkSample], test_share: float = 0.2) -> tuple[list[int], list[int]]:
    """Split by architecture hash: every copy of an architecture lands on the same side."""
    train: list[int] = []
    test: list[int] = []
    for i, sample in enumerate(samples):
        bucket = int(hashlib.sha256(sample.network.content_hash.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (test if bucket < test_share else train).append(i)
    return train, test


def default_baselines() -> list[Callable[[], NetworkLatencyModel]]:
    return [LayerForestSum, FlopsLinear, LayerLookupSum]


def evaluate_split(
    name: str,
    samples: Sequence[NetworkSample],
    train_index: Sequence[int],
    test_index: Sequence[int],
    config: LPNetConfig | None = None,
    train_config: TrainConfig | None = None,
    baselines: Sequence[Callable[[], NetworkLatencyModel]] | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[SplitResult, LatencyPredictor]:
    """Fit LPNet and each baseline on `train_index`, predict `test_index`."""
    train_samples = [samples[i] for i in train_index]
    test_samples = [samples[i] for i in test_index]
    result = SplitResult(
        name=name,
        measured=np.array([s.latency_ms for s in test_samples]),
        families=[s.group for s in test_samples],
    )
    predictor = fit_predictor(train_samples, config, train_config, progress)
    predictions = [predictor.predict(s.network) for s in test_samples]
    result.predictions[LPNET_NAME] = np.array([p.total_ms for p in predictions])
    result.intervals = (np.array([p.low_ms for p in predictions]), np.array([p.high_ms for p in predictions]))
    for factory in baselines if baselines is not None else default_baselines():
        model = factory()
        try:
            model.fit(train_samples)
        except ValueError as exc:  # e.g. layer-level baselines on a profile without per-layer timings
            logger.warning("baseline %s not fitted: %s", model.name, exc)
            result.skipped[model.name] = str(exc)
            continue
        result.predictions[model.name] = model.predict([s.network for s in test_samples])
    return result, predictor


def leave_one_family_out(
    samples: Sequence[NetworkSample],
    config: LPNetConfig | None = None,
    train_config: TrainConfig | None = None,
    baselines: Sequence[Callable[[], NetworkLatencyModel]] | None = None,
    always_trained: Sequence[str] = (),
) -> list[SplitResult]:
    """One split per family: train on every other family, test on it.

    Families in `always_trained` (e.g. the op-coverage network every profile holds) are never left
    out, and stay in every training set.
    """
    families = sorted({s.group for s in samples} - set(always_trained))
    results = []
    for family in families:
        test = [i for i, s in enumerate(samples) if s.group == family]
        train = [i for i, s in enumerate(samples) if s.group != family]
        result, _ = evaluate_split(f"without {family}", samples, train, test, config, train_config, baselines)
        results.append(result)
    return results


def metrics_table(results: Sequence[SplitResult]) -> list[dict[str, Any]]:
    """Rows of (split, model, metrics) for printing and JSON."""
    rows = []
    for result in results:
        for model, metrics in result.metrics().items():
            rows.append({"split": result.name, "model": model, **metrics.to_dict()})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = f"{'split':<28} {'model':<24} {'n':>4} {'±5%':>6} {'±10%':>6} {'RMSPE':>7} {'MAPE':>6} {'rho':>6} {'tau':>6} {'cover':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        cover = "" if r["interval_coverage"] is None else f"{r['interval_coverage']:.2f}"
        lines.append(
            f"{r['split']:<28} {r['model']:<24} {r['count']:>4} {r['within_5pct']:>6.1%} {r['within_10pct']:>6.1%} "
            f"{r['rmspe']:>7.2%} {r['mape']:>6.2%} {r['spearman']:>6.3f} {r['kendall']:>6.3f} {cover:>6}"
        )
    return "\n".join(lines)


def scatter_plot(result: SplitResult, path: Path | BinaryIO) -> None:
    """Predicted-vs-measured scatter of every model on one split, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result.predictions)
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
    lo = float(min(result.measured.min(), *(p.min() for p in result.predictions.values()))) * 0.9
    hi = float(max(result.measured.max(), *(p.max() for p in result.predictions.values()))) * 1.1
    families = sorted(set(result.families))
    for ax, model in zip(axes[0], models, strict=True):
        predicted = result.predictions[model]
        for family in families:
            mask = np.array([f == family for f in result.families])
            ax.scatter(result.measured[mask], predicted[mask], s=10, label=family, alpha=0.8)
        xs = np.array([lo, hi])
        ax.plot(xs, xs, "k-", lw=0.8)
        ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.15, label="±10 %")
        metrics = accuracy_metrics(predicted, result.measured)
        ax.set_title(f"{model}\n±10 %: {metrics.within_10pct:.1%}  RMSPE {metrics.rmspe:.1%}", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(result.name)
    fig.tight_layout()
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
