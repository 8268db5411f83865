"""The timing protocol: warm up, then repeat until the median is both long-run and precise.

Per-forward latency on a busy CPU has a CV of several percent, but the median settles quickly; so the
protocol keeps sampling until (a) at least `min_repeat_ms` of samples and `min_repetitions` exist
and (b) a distribution-free confidence interval of the median is narrower than
`target_precision` of the median, or until a cap is hit, which the result records.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from profiler.backends.base import Runnable

SampleFn = Callable[[int], float]
"""Runs `number` forwards and returns milliseconds per forward."""
ProbeFn = Callable[[], float]
"""Times the speed probe once (profiler.speed.SpeedProbe.run): milliseconds per probe forward."""


class StopReason(StrEnum):
    PRECISION = "precision"
    MAX_REPETITIONS = "max_repetitions"
    MAX_SECONDS = "max_seconds"


class TimingProtocol(BaseModel):
    """How long and how often to time; stored with every run."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    warmup_runs: int = Field(default=5, ge=0, le=10_000)
    warmup_ms: float = Field(default=200.0, ge=0)
    min_repeat_ms: float = Field(default=500.0, ge=0)
    min_repetitions: int = Field(default=20, ge=3)
    max_repetitions: int = Field(default=2000, ge=3)
    target_precision: float = Field(default=0.01, gt=0, lt=1)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    max_seconds: float = Field(default=30.0, gt=0)
    min_sample_ms: float = Field(default=0.5, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> TimingProtocol:
        if self.min_repetitions > self.max_repetitions:
            raise ValueError(
                f"min_repetitions={self.min_repetitions} exceeds max_repetitions={self.max_repetitions}"
            )
        return self

    @classmethod
    def quick(cls) -> TimingProtocol:
        """A loose protocol for smoke runs and tests: seconds, not minutes."""
        return cls(
            warmup_runs=2,
            warmup_ms=10,
            min_repeat_ms=50,
            min_repetitions=7,
            max_repetitions=200,
            target_precision=0.05,
            max_seconds=2.0,
        )

    @classmethod
    def budgeted(cls) -> TimingProtocol:
        """The protocol of a profile under a time budget (the first run, `lpnet profile --budget-minutes`):
        each sample until its median is 3 % precise, for at most 6 s.

        Two fresh processes timing the same network differ by up to 10 % on a shared machine, so a
        median 1 % precise within one process buys the fit little, and at 8 % variation between
        forwards it takes most samples to the cap. At 3 % a sample stops after about a third of the
        time, and a budget measures about three times as many networks, which the fit does use.
        The cap keeps a busy machine, where no sample reaches its precision, from measuring only a
        few dozen.
        """
        return cls(target_precision=0.03, max_seconds=6.0)


class TimingResult(BaseModel):
    """Summary statistics of one timed configuration, per forward, in milliseconds."""

    model_config = ConfigDict(frozen=True)

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    cv: float
    repetitions: int
    number: int = Field(description="forwards per timed sample (>1 only for very short forwards)")
    precision: float = Field(
        description="half-width of the median's confidence interval / median (of the probe ratios when probed)"
    )
    precision_reached: bool
    stopped_by: StopReason
    total_seconds: float
    probe_ms: float | None = Field(
        default=None, description="median speed-probe forward, timed around every sample (None: no probe)"
    )
    relative: float | None = Field(
        default=None, description="median of per-sample latency / probe: the latency in probe forwards"
    )


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect young garbage, then keep the cyclic collector off; restore its state even on error.

    Only the young generations are collected: they hold what building the module left behind, and a
    full collection of a process with torch loaded costs ~0.3 s per measurement.
    """
    was_enabled = gc.isenabled()
    gc.collect(1)
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def median_precision(sorted_samples: np.ndarray, confidence: float) -> float:
    """Relative half-width of the order-statistic confidence interval of the median.

    Distribution-free: the ranks n/2 -+ z*sqrt(n)/2 bound the median with the given confidence.
    """
    n = len(sorted_samples)
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    lo = max(1, math.floor(n / 2 - z * math.sqrt(n) / 2))
    hi = min(n, math.ceil(n / 2 + z * math.sqrt(n) / 2 + 1))
    median = float(np.median(sorted_samples))
    if median <= 0:
        return math.inf
    return float(sorted_samples[hi - 1] - sorted_samples[lo - 1]) / 2 / median


def summarize(
    samples: list[float] | np.ndarray,
    number: int,
    protocol: TimingProtocol,
    stopped_by: StopReason,
    total_seconds: float,
) -> TimingResult:
    """Statistics of per-forward samples (milliseconds)."""
    values = np.sort(np.asarray(samples, dtype=np.float64))
    if len(values) == 0:
        raise ValueError("no samples to summarise")
    mean = float(values.mean())
    precision = median_precision(values, protocol.confidence) if len(values) >= 3 else math.inf
    p10, median, p90 = (float(v) for v in np.percentile(values, [10, 50, 90]))
    return TimingResult(
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        mean_ms=mean,
        min_ms=float(values[0]),
        cv=float(values.std(ddof=1) / mean) if len(values) > 1 and mean > 0 else 0.0,
        repetitions=len(values),
        number=number,
        precision=precision,
        precision_reached=precision <= protocol.target_precision,
        stopped_by=stopped_by,
        total_seconds=total_seconds,
    )


def measure(
    sample: SampleFn, protocol: TimingProtocol, calibrate: bool = True, probe: ProbeFn | None = None
) -> TimingResult:
    """Time `sample` under `protocol` with the garbage collector paused.

    Args:
        sample: runs `number` forwards, returns milliseconds per forward.
        protocol: warm-up, stopping rule and caps.
        calibrate: group forwards shorter than `min_sample_ms` into one sample, so the clock's own
            cost stays negligible. Off when each sample must be exactly one forward.
        probe: when given, timed right before and right after every sample; the result adds the
            median probe time and the median ratio of each sample to the mean of its two probes,
            and the stopping rule then applies to those ratios, the quantity the caller is after.
    """
    start = time.perf_counter()
    deadline = start + protocol.max_seconds
    with gc_paused():
        warm: list[float] = []
        while len(warm) < protocol.warmup_runs or sum(warm) < protocol.warmup_ms:
            warm.append(sample(1))
            if probe is not None:
                probe()
            # A warm-up that eats the time budget leaves no time to measure: stop at a quarter.
            if time.perf_counter() - start > protocol.max_seconds / 4:
                break
        number = 1
        if calibrate and protocol.min_sample_ms > 0:
            fastest = min(warm) if warm else sample(1)
            if fastest > 0:
                number = max(1, math.ceil(protocol.min_sample_ms / fastest))

        samples: list[float] = []
        probes: list[float] = []
        ratios: list[float] = []
        elapsed_ms = 0.0
        next_check = protocol.min_repetitions
        stopped_by = StopReason.MAX_REPETITIONS
        while len(samples) < protocol.max_repetitions:
            if probe is None:
                value = sample(number)
            else:
                before = probe()
                value = sample(number)
                speed = (before + probe()) / 2
                probes.append(speed)
                ratios.append(value / speed if speed > 0 else math.inf)
            samples.append(value)
            elapsed_ms += value * number
            n = len(samples)
            if n >= next_check and elapsed_ms >= protocol.min_repeat_ms:
                # Re-checking every sample costs a sort each; every ~5 % more samples is enough.
                next_check = n + max(1, n // 20)
                watched = ratios if probe is not None else samples
                if (
                    median_precision(np.sort(np.asarray(watched)), protocol.confidence)
                    <= protocol.target_precision
                ):
                    stopped_by = StopReason.PRECISION
                    break
            if n >= 3 and time.perf_counter() >= deadline:
                stopped_by = StopReason.MAX_SECONDS
                break
    result = summarize(samples, number, protocol, stopped_by, time.perf_counter() - start)
    if probe is None:
        return result
    # The stopping rule watched the ratios: their precision is the one this result reports.
    precision = (
        median_precision(np.sort(np.asarray(ratios)), protocol.confidence) if len(ratios) >= 3 else math.inf
    )
    return result.model_copy(
        update={
            "probe_ms": float(np.median(probes)),
            "relative": float(np.median(ratios)),
            "precision": precision,
            "precision_reached": precision <= protocol.target_precision,
        }
    )


def measure_runnable(
    runnable: Runnable, protocol: TimingProtocol, probe: ProbeFn | None = None
) -> TimingResult:
    """Time whole forwards of a prepared runnable, each sample between two probes when `probe` is given."""
    return measure(runnable.timed_runs, protocol, probe=probe)


class LayerwiseTiming(BaseModel):
    """A whole-network timing and, from forwards interleaved with it, each node's in-context median."""

    model_config = ConfigDict(frozen=True)

    network: TimingResult
    layers_ms: dict[str, float]
    layerwise_total: TimingResult


def measure_layerwise(
    runnable: Runnable, protocol: TimingProtocol, probe: ProbeFn | None = None
) -> LayerwiseTiming:
    """Alternate one plain forward with one node-by-node timed forward until the plain ones meet the protocol.

    Interleaving makes both see the same machine state: timed one after the other, a change in
    background load between the two phases would show up as a false gap between the network and
    the sum of its layers.
    """
    per_node: dict[str, list[float]] = {}
    totals: list[float] = []

    def paired_forward(number: int) -> float:
        network_ms = runnable.timed_runs(number)
        for _ in range(number):
            times = runnable.run_layerwise()
            for name, ms in times.items():
                per_node.setdefault(name, []).append(ms)
            totals.append(sum(times.values()))
        return network_ms

    # A probe brackets each pair: the network's ratio is to the probe, the layers scale with it.
    network = measure(paired_forward, protocol, calibrate=False, probe=probe)
    # Warm-up forwards are recorded too: keep the last ones, those paired with the timed samples.
    kept = network.repetitions
    layers = {name: float(np.median(values[-kept:])) for name, values in per_node.items()}
    layerwise_total = summarize(totals[-kept:], 1, protocol, network.stopped_by, network.total_seconds)
    return LayerwiseTiming(network=network, layers_ms=layers, layerwise_total=layerwise_total)
