"""Latencies at the device's nominal speed, from rows timed against the speed probe."""

from __future__ import annotations

import pytest

from lpnet.arch.ir import Network
from profiler.batch import Measurement
from profiler.device import local_device_spec
from profiler.runner import RunSummary
from profiler.speed import (
    PROBE_VERSION,
    SPEED_SHIFT,
    UNSTEADY_SLOWDOWN,
    at_nominal_speed,
    nominal_probe_ms,
    speed_shift,
    steadiness_warning,
    typical_slowdown,
)
from tests.profiler.test_batch import in_context_row, network_row


def probed(
    row: dict[str, object], probe_ms: float, relative: float, version: int = PROBE_VERSION
) -> Measurement:
    return Measurement.model_validate(
        {**row, "probe_ms": probe_ms, "relative_latency": relative, "probe_version": version}
    )


def run_with_probes(network: Network, probes: list[float]) -> RunSummary:
    """A run's summary of one network row per probe time, in that order."""
    summary = RunSummary(device=local_device_spec(threads=1))
    for i, probe in enumerate(probes):
        summary.add(probed(network_row(network, f"network-{i:04d}"), probe, 2.0), 0.5)
    return summary


def test_the_nominal_probe_is_the_median_of_this_probe_version(tiny_network: Network) -> None:
    rows = [
        probed(network_row(tiny_network, "network-0001"), 1.0, 2.0),
        probed(network_row(tiny_network, "network-0002"), 3.0, 2.0),
        probed(network_row(tiny_network, "network-0003"), 2.0, 2.0),
        probed(network_row(tiny_network, "network-0004"), 50.0, 2.0, version=PROBE_VERSION + 1),
        Measurement.model_validate(network_row(tiny_network, "network-0005")),
    ]
    assert nominal_probe_ms(rows) == pytest.approx(2.0)
    assert nominal_probe_ms(rows[3:]) is None


def test_a_slow_moment_is_scaled_back_to_the_nominal_speed(tiny_network: Network) -> None:
    # Measured while the probe ran at 1.5 ms instead of its nominal 1.0 ms: everything took 1.5x.
    row = probed(in_context_row(tiny_network), probe_ms=1.5, relative=0.8)
    network_ms, per_layer = at_nominal_speed(row, nominal_ms=1.0)
    assert network_ms == pytest.approx(0.8)
    assert per_layer is not None and set(per_layer) == {layer.name for layer in tiny_network.layers}
    assert all(ms == pytest.approx(0.01 / 1.5) for ms in per_layer.values())


def test_rows_without_this_probe_cannot_be_normalised(tiny_network: Network) -> None:
    plain = Measurement.model_validate(network_row(tiny_network))
    other = probed(network_row(tiny_network), 1.0, 2.0, version=PROBE_VERSION + 1)
    for row in (plain, other):
        with pytest.raises(ValueError, match="no speed probe of version"):
            at_nominal_speed(row, 1.0)


def test_a_quiet_run_with_spikes_is_steady_and_a_loaded_one_is_not(tiny_network: Network) -> None:
    # Quiet: the probe near 0.78 ms with one slow reading in eight (a spike, a process change).
    quiet = [0.78 + 0.01 * (i % 5) for i in range(56)] + [1.25] * 8
    assert typical_slowdown(quiet) == pytest.approx(0.80 / 0.78 - 1)
    assert steadiness_warning(typical_slowdown(quiet)) is None
    # Loaded for most of the run: the median probe moves with the load.
    loaded = [0.78] * 16 + [1.05 + 0.01 * (i % 7) for i in range(48)]
    slowdown = typical_slowdown(loaded)
    assert slowdown is not None and slowdown > UNSTEADY_SLOWDOWN
    assert f"{slowdown:.0%} slower" in (steadiness_warning(slowdown) or "")
    assert typical_slowdown(loaded[:9]) is None

    summary = run_with_probes(tiny_network, loaded)
    assert summary.to_dict()["typical_slowdown"] == pytest.approx(slowdown)
    assert "UNSTEADY: the machine ran" in summary.format_table()
    quiet_summary = run_with_probes(tiny_network, quiet)
    assert "UNSTEADY" not in quiet_summary.format_table()
    assert "speed probe: median 0.800 ms" in quiet_summary.format_table()


def test_a_run_whose_speed_moves_partway_is_flagged_though_never_slow_for_long(tiny_network: Network) -> None:
    # 0.95 ms for the first half, then a fifth faster: the median is near the quiet tenth's either
    # way, so the slowdown alone does not see it; the shift between the thirds does.
    faster = [0.95 + 0.005 * (i % 3) for i in range(40)] + [0.74 + 0.005 * (i % 3) for i in range(40)]
    shift = speed_shift(faster)
    assert shift == pytest.approx(0.745 / 0.955 - 1, abs=0.01)
    assert shift is not None and shift < -SPEED_SHIFT
    warning = steadiness_warning(typical_slowdown(faster), shift) or ""
    assert f"{abs(shift):.0%} faster in the last third" in warning
    assert "slower than its quiet speed" not in warning
    slower = list(reversed(faster))
    assert f"{speed_shift(slower):.0%} slower in the last third" in (
        steadiness_warning(None, speed_shift(slower)) or ""
    )
    # Steady with spikes: no shift worth a word, and too few probes say nothing.
    steady = [0.78 + 0.01 * (i % 5) for i in range(56)] + [1.25] * 8
    assert abs(speed_shift(steady) or 1.0) < SPEED_SHIFT
    assert steadiness_warning(typical_slowdown(steady), speed_shift(steady)) is None
    assert speed_shift(faster[:29]) is None

    summary = run_with_probes(tiny_network, faster)
    assert summary.to_dict()["speed_shift"] == pytest.approx(shift)
    assert "UNSTEADY: the machine ran" in summary.format_table()
