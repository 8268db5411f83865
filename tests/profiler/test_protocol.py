from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from lpnet.arch.ir import Network
from profiler.backends import get_backend
from profiler.protocol import StopReason, TimingProtocol, measure, measure_runnable, median_precision


def noisy_sleeper(base_ms: float, cv: float, seed: int = 0) -> Callable[[int], float]:
    """A sample function that really sleeps, with log-normal-ish jitter of a given CV."""
    rng = np.random.default_rng(seed)

    def sample(number: int) -> float:
        ms = base_ms * float(np.exp(rng.normal(0.0, cv)))
        start = time.perf_counter()
        while (time.perf_counter() - start) * 1e3 < ms * number:
            pass
        return (time.perf_counter() - start) * 1e3 / number

    return sample


def test_real_network_statistics_are_ordered(tiny_network: Network) -> None:
    runnable = get_backend("torch-cpu").prepare(tiny_network)
    protocol = TimingProtocol(min_repeat_ms=100, min_repetitions=10, max_seconds=2, target_precision=0.02)
    result = measure_runnable(runnable, protocol)
    assert result.p10_ms <= result.median_ms <= result.p90_ms
    assert result.min_ms <= result.p10_ms
    assert result.cv >= 0
    assert result.repetitions >= protocol.min_repetitions
    assert result.total_seconds > 0


def test_minimum_time_and_repetitions_are_honoured() -> None:
    protocol = TimingProtocol(
        warmup_runs=1, warmup_ms=0, min_repeat_ms=150, min_repetitions=5, target_precision=0.5, max_seconds=5
    )
    result = measure(noisy_sleeper(1.0, 0.01), protocol)
    # 1 ms per sample: precision is met at once, so only the 150 ms minimum keeps it going.
    assert result.repetitions * result.mean_ms * result.number >= 150 - 1e-6
    assert result.stopped_by is StopReason.PRECISION
    assert result.precision_reached


def test_noisier_timings_take_more_repetitions_to_reach_precision() -> None:
    protocol = TimingProtocol(
        warmup_runs=1,
        warmup_ms=0,
        min_repeat_ms=0,
        min_repetitions=5,
        target_precision=0.02,
        max_seconds=10,
        min_sample_ms=0,
    )
    quiet = measure(noisy_sleeper(0.3, 0.01, seed=1), protocol)
    noisy = measure(noisy_sleeper(0.3, 0.15, seed=1), protocol)
    assert quiet.precision_reached and noisy.precision_reached
    assert noisy.precision <= 0.02
    assert noisy.repetitions > 2 * quiet.repetitions


def test_caps_are_recorded_when_precision_is_not_reached() -> None:
    protocol = TimingProtocol(
        warmup_runs=0,
        warmup_ms=0,
        min_repeat_ms=0,
        min_repetitions=3,
        max_repetitions=8,
        target_precision=0.001,
        min_sample_ms=0,
    )
    result = measure(noisy_sleeper(0.2, 0.3), protocol)
    assert result.repetitions == 8
    assert result.stopped_by is StopReason.MAX_REPETITIONS
    assert not result.precision_reached

    timed = TimingProtocol(
        warmup_runs=0,
        warmup_ms=0,
        min_repeat_ms=0,
        min_repetitions=3,
        target_precision=0.0001,
        max_seconds=0.2,
        min_sample_ms=0,
    )
    start = time.perf_counter()
    result = measure(noisy_sleeper(2.0, 0.3), timed)
    assert time.perf_counter() - start < 1.0
    assert result.stopped_by is StopReason.MAX_SECONDS
    assert not result.precision_reached


def test_short_forwards_are_grouped_into_longer_samples() -> None:
    protocol = TimingProtocol(warmup_runs=3, min_repeat_ms=10, min_sample_ms=1.0, max_seconds=2)
    result = measure(noisy_sleeper(0.05, 0.01), protocol)
    assert result.number >= 10
    assert result.median_ms == pytest.approx(0.05, rel=0.5)


def test_gc_is_off_while_timing_and_restored_after() -> None:
    states: list[bool] = []

    def sample(number: int) -> float:
        states.append(gc.isenabled())
        return 1.0

    assert gc.isenabled()
    measure(sample, TimingProtocol(min_repeat_ms=0, max_repetitions=10, min_repetitions=5))
    assert states and not any(states)
    assert gc.isenabled()


def test_gc_is_restored_after_an_error() -> None:
    def failing(number: int) -> float:
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        measure(failing, TimingProtocol())
    assert gc.isenabled()


def test_gc_stays_off_if_it_was_off() -> None:
    gc.disable()
    try:
        measure(lambda _number: 1.0, TimingProtocol(min_repeat_ms=0, max_repetitions=5, min_repetitions=5))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_median_precision_shrinks_with_more_samples() -> None:
    rng = np.random.default_rng(0)
    small = np.sort(rng.normal(10, 1, 20))
    large = np.sort(rng.normal(10, 1, 2000))
    assert median_precision(large, 0.95) < median_precision(small, 0.95)
    # Theory: half-width ~ 1.96 * 1.2533 * sigma / sqrt(n) relative to the median.
    assert median_precision(large, 0.95) == pytest.approx(1.96 * 1.2533 * 0.1 / np.sqrt(2000), rel=0.3)


def test_protocol_is_serialisable_and_validated() -> None:
    protocol = TimingProtocol(target_precision=0.02)
    assert TimingProtocol.model_validate_json(protocol.model_dump_json()) == protocol
    with pytest.raises(ValidationError, match="exceeds max_repetitions"):
        TimingProtocol(min_repetitions=50, max_repetitions=10)
    with pytest.raises(ValidationError):
        TimingProtocol(target_precision=0)
