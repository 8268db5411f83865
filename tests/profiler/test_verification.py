"""Verification timings: whole networks at a nominal machine speed, with the raw median beside it."""

from __future__ import annotations

from typing import ClassVar

import pytest

from lpnet.arch.ir import Network
from profiler.backends.torch_cpu import TorchCpuBackend
from profiler.protocol import StopReason, TimingProtocol, TimingResult
from profiler.verification import NetworkMeter, measured_latency

QUICK = TimingProtocol(warmup_runs=2, min_repetitions=5, max_repetitions=15, max_seconds=5.0)


def timing(median_ms: float, probe_ms: float | None = None, relative: float | None = None) -> TimingResult:
    return TimingResult(
        median_ms=median_ms,
        p10_ms=median_ms,
        p90_ms=median_ms,
        mean_ms=median_ms,
        min_ms=median_ms,
        cv=0.0,
        repetitions=10,
        number=1,
        precision=0.01,
        precision_reached=True,
        stopped_by=StopReason.PRECISION,
        total_seconds=0.1,
        probe_ms=probe_ms,
        relative=relative,
    )


def test_a_probed_timing_is_reported_at_the_nominal_speed() -> None:
    # Timed while the probe took 1.5 ms instead of its nominal 1.0 ms: the raw 3 ms is 2 ms nominally.
    measured = measured_latency(timing(3.0, probe_ms=1.5, relative=2.0), nominal_probe_ms=1.0)
    assert measured.ms == pytest.approx(2.0)
    assert (measured.raw_ms, measured.probe_ms, measured.nominal_probe_ms) == (3.0, 1.5, 1.0)


def test_without_a_probe_or_a_nominal_speed_the_raw_median_is_judged() -> None:
    # A probe without a nominal speed is still reported: it tells how fast the machine ran.
    for result, nominal, probe in ((timing(3.0), 1.0, None), (timing(3.0, 1.5, 2.0), None, 1.5)):
        measured = measured_latency(result, nominal)
        assert (measured.ms, measured.raw_ms, measured.probe_ms, measured.nominal_probe_ms) == (
            3.0,
            3.0,
            probe,
            None,
        )


def test_a_probed_meter_times_a_real_network_against_the_probe(tiny_network: Network) -> None:
    meter = NetworkMeter.probed(TorchCpuBackend(threads=1), QUICK, nominal_probe_ms=2.0)
    assert meter.probe is not None and meter.nominal_probe_ms == 2.0
    result = meter.timing(tiny_network)
    assert result.probe_ms is not None and result.probe_ms > 0
    assert result.relative is not None and result.relative > 0
    measured = meter(tiny_network)
    assert measured.nominal_probe_ms == 2.0 and measured.probe_ms is not None
    assert measured.raw_ms > 0 and measured.ms > 0


def test_without_a_nominal_speed_the_meter_probes_the_machine_now(tiny_network: Network) -> None:
    meter = NetworkMeter.probed(TorchCpuBackend(threads=1), QUICK)
    assert meter.nominal_probe_ms is not None
    # The probe is about a millisecond of convolutions on one core: far above timer resolution.
    assert 0.05 < meter.nominal_probe_ms < 100


class _OffCpuBackend(TorchCpuBackend):
    """The CPU backend declared as running elsewhere, as an accelerator backend is."""

    runs_on_cpu: ClassVar[bool] = False


def test_a_backend_off_the_cpu_gets_raw_medians(tiny_network: Network) -> None:
    meter = NetworkMeter.probed(_OffCpuBackend(threads=1), QUICK, nominal_probe_ms=2.0)
    assert meter.probe is None and meter.nominal_probe_ms is None
    measured = meter(tiny_network)
    assert measured.ms == measured.raw_ms and measured.probe_ms is None
