"""Latencies at the device's nominal speed, from rows timed against the speed probe."""

from __future__ import annotations

import pytest

from lpnet.arch.ir import Network
from profiler.batch import Measurement
from profiler.speed import PROBE_VERSION, at_nominal_speed, nominal_probe_ms
from tests.profiler.test_batch import in_context_row, network_row


def probed(
    row: dict[str, object], probe_ms: float, relative: float, version: int = PROBE_VERSION
) -> Measurement:
    return Measurement.model_validate(
        {**row, "probe_ms": probe_ms, "relative_latency": relative, "probe_version": version}
    )


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
