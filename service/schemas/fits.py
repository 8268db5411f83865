"""What a predictor fit stores: its accuracy metrics, and the results of the jobs that fit one.

Metrics are written by `service.predictors.fit_from_samples` (`lpnet.predictor.report.fit_with_report`
plus what the training labels mean), and come back from an imported predictor artifact's header, which
may hold anything: every metric is optional, and one that does not fit its type is left out of the
answer (`LenientDocument`). The job results are those of the fit, bootstrap and refine jobs
(`service.predictors.run_fit_job`, `service.first_run`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.schemas.documents import LenientDocument, StoredDocument


class AccuracyRead(LenientDocument):
    """Accuracy of one model's predictions on the held-out networks (`lpnet.predictor.metrics`).

    Shares and errors are fractions (0.05 is 5 %). A rank correlation is null when it is undefined
    (fewer than three networks, or constant latencies).
    """

    split: str | None = Field(default=None, description="The test split, e.g. held-out architectures.")
    model: str | None = Field(default=None, description="LPNet, or the baseline's name.")
    count: int | None = Field(default=None, description="Networks predicted.")
    within_5pct: float | None = Field(default=None, description="Share predicted within 5 % of measured.")
    within_10pct: float | None = Field(default=None, description="Share predicted within 10 % of measured.")
    rmspe: float | None = Field(default=None, description="Root mean squared percentage error.")
    mape: float | None = Field(default=None, description="Mean absolute percentage error.")
    spearman: float | None = Field(default=None, description="Spearman rank correlation.")
    kendall: float | None = Field(default=None, description="Kendall rank correlation.")
    interval_coverage: float | None = Field(
        default=None, description="Share of measured latencies inside the predicted interval (LPNet only)."
    )


class PredictorMetrics(LenientDocument):
    """How well a predictor predicts networks it did not see, beside the baselines, and what its
    latencies mean."""

    split: str | None = Field(default=None, description="How the held-out networks were chosen.")
    train_networks: int | None = Field(
        default=None, description="Networks the predictor is fitted on (each member without its fold)."
    )
    test_networks: int | None = Field(
        default=None,
        description="Networks judged, each by the member (and baselines) fitted without its fold.",
    )
    families: list[str] | None = Field(default=None, description="Model families among the samples.")
    fit_seconds: float | None = Field(default=None, description="Time the fit and its evaluation took.")
    lpnet: AccuracyRead | None = Field(default=None, description="The predictor's own accuracy.")
    baselines: list[AccuracyRead] | None = Field(default=None, description="Each baseline's accuracy.")
    baselines_not_fitted: dict[str, str] | None = Field(
        default=None, description="Baselines that could not be fitted, and why."
    )
    labels: Literal["ms", "probe"] | None = Field(
        default=None,
        description="ms: latencies as measured; probe: scaled to the device's nominal speed-probe time.",
    )
    nominal_probe_ms: float | None = Field(
        default=None, description="The speed-probe time latencies are scaled to (probe labels only)."
    )
    timings: int | None = Field(default=None, description="Measurement rows behind the samples.")
    typical_slowdown: float | None = Field(
        default=None,
        description="How much slower than its quiet speed the machine ran during those measurements: the "
        "median speed-probe time over its 10th percentile, minus one. Past 0.15 another load held the "
        "CPU for most of them, and the predictor describes that load.",
    )
    speed_shift: float | None = Field(
        default=None,
        description="How much the machine's speed moved while they were measured: the median speed-probe "
        "time of the last third over that of the first third, minus one (negative: faster by the end). "
        "Past +-0.15 the probe takes out only part of the change.",
    )
    last_level_cache_kb: int | None = Field(
        default=None,
        description="The device's last-level cache (KiB); null when unknown. The smaller of it and "
        "`fresh_mapping_kb` is the spill point the fit priced layers' weights past; with neither known, "
        "no layer is priced as spilling.",
    )
    fresh_mapping_kb: int | None = Field(
        default=None,
        description="The block size (KiB) past which the device's C library maps every allocation afresh "
        "from the kernel (glibc: 32 MiB), so that a convolution with more weights page-faults their "
        "reordered copy in on every call; null when unknown.",
    )


class _FittedResult(StoredDocument):
    """What every job that fits a predictor reports."""

    device_id: int
    samples: int = Field(description="Architectures the fit learnt from (repeated timings count once).")
    metrics: PredictorMetrics
    training_fingerprint: str = Field(description="Hash of the training samples.")
    predictor_id: int = Field(description="The predictor stored.")
    version: int = Field(description="Its version among the device's predictors.")


class FitJobResult(_FittedResult):
    """The result of a fit job (kind fit)."""

    seconds: float = Field(description="Time the fit took.")


class _ProfiledFitResult(_FittedResult):
    """What a first-run job that profiles this machine and fits it a predictor reports."""

    device: str = Field(description="The device's name.")
    profiled_seconds: float = Field(description="Time spent profiling.")
    measured_this_run: int = Field(description="Samples this job measured.")
    fit_seconds: float = Field(description="Time the fit took.")


class BootstrapJobResult(_ProfiledFitResult):
    """The result of a first-run bootstrap job (kind bootstrap)."""


class RefineJobResult(_ProfiledFitResult):
    """The result of one round of refining a first-run device's predictor (kind refine)."""

    round: int = Field(description="This round's number, from 1.")
    rounds: int = Field(description="Rounds in all.")
    sampled_by_version: int = Field(
        description="The predictor version that chose where to measure (where it was least sure)."
    )
