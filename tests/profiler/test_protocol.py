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
from profiler.speed import SpeedProbe


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


def test_a_probe_takes_out_the_machine_speed_the_milliseconds_carry() -> None:
    """Every other sample runs on a machine half as fast: the network and the probe slow down together."""
    calls = {"sample": 0, "probe": 0}

    def slowdown(count: int) -> float:
        return 2.0 if (count // 10) % 2 else 1.0  # speed changes every ten samples

    def sample(number: int) -> float:
        calls["sample"] += 1
        return 3.0 * slowdown(calls["sample"])

    def probe() -> float:
        calls["probe"] += 1
        return 0.5 * slowdown((calls["probe"] + 1) // 2 + 1)  # the sample it brackets

    protocol = TimingProtocol(
        warmup_runs=2, warmup_ms=0, min_repeat_ms=0, min_repetitions=40, target_precision=0.01, max_seconds=5
    )
    raw = measure(sample, protocol, calibrate=False)
    calls.update(sample=0, probe=0)
    probed = measure(sample, protocol, calibrate=False, probe=probe)
    # The milliseconds straddle the two speeds and never settle; the ratio is 6 probe forwards throughout.
    assert raw.probe_ms is None and raw.relative is None and not raw.precision_reached
    assert probed.relative == pytest.approx(6.0)
    assert probed.probe_ms is not None and 0.5 <= probed.probe_ms <= 1.0
    assert probed.precision_reached and probed.stopped_by is StopReason.PRECISION
    # Two probes per sample, one after every warm-up forward.
    assert calls["probe"] == 2 * probed.repetitions + 2


def test_the_speed_probe_brackets_real_network_samples(tiny_network: Network) -> None:
    runnable = get_backend("torch-cpu").prepare(tiny_network)
    protocol = TimingProtocol(min_repeat_ms=50, min_repetitions=10, max_seconds=2, target_precision=0.05)
    probe = SpeedProbe()
    result = measure_runnable(runnable, protocol, probe.run)
    assert result.probe_ms is not None and result.probe_ms > 0
    assert result.relative is not None
    # The median ratio and the ratio of medians describe the same samples.
    assert 0.5 < result.relative * result.probe_ms / result.median_ms < 2.0
    with pytest.raises(ValueError, match="forwards must be at least 1"):
        SpeedProbe(forwards=0)


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
