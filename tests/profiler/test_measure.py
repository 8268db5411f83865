from __future__ import annotations

import pytest

from lpnet.arch.groups import apply_width_vector, channel_groups
from lpnet.arch.ir import Layer, Network, Op
from profiler.backends import get_backend
from profiler.batch import MeasurementKind
from profiler.device import DeviceSpec
from profiler.measure import (
    isolated_network,
    measure_in_context,
    measure_layer,
    measure_network,
    measure_sample,
)
from profiler.protocol import TimingProtocol
from profiler.sampling import Sample
from profiler.speed import PROBE_VERSION, SpeedProbe


def test_in_context_layers_add_up_to_the_network_within_the_residual(
    tiny_network: Network, fast_protocol: TimingProtocol
) -> None:
    backend = get_backend("torch-cpu")
    result = measure_in_context(tiny_network, backend, fast_protocol)
    assert set(result.layers_ms) == {layer.name for layer in tiny_network.layers}
    assert all(ms > 0 for ms in result.layers_ms.values())
    assert result.layers_sum_ms + result.residual_ms == pytest.approx(result.network.median_ms)
    # Timing inside the forward must not invent or lose a large share of the network's time.
    assert 0.6 < result.additivity < 1.5
    conv_ms = sum(ms for name, ms in result.layers_ms.items() if tiny_network.by_name[name].op is Op.CONV2D)
    assert conv_ms > 0.5 * result.layers_sum_ms


def test_pruning_makes_the_network_faster(tiny_network: Network, fast_protocol: TimingProtocol) -> None:
    backend = get_backend("torch-cpu")
    protocol = fast_protocol.model_copy(update={"target_precision": 0.02, "max_seconds": 1.0})
    full = measure_network(tiny_network, backend, protocol)
    narrow = [max(1, g.channels // 8) for g in channel_groups(tiny_network)]
    pruned = measure_network(tiny_network, backend, protocol, width_vector=narrow)
    assert pruned.median_ms < full.median_ms
    assert apply_width_vector(tiny_network, narrow).content_hash != tiny_network.content_hash


@pytest.mark.parametrize("op", [Op.CONV2D, Op.LINEAR, Op.ADD, Op.CONCAT, Op.ADAPTIVE_AVGPOOL2D])
def test_isolated_layers_run_on_their_own(op: Op, fast_protocol: TimingProtocol) -> None:
    fields: dict[str, object] = {
        "name": "x",
        "op": op,
        "inputs": ["a"],
        "in_channels": 8,
        "out_channels": 8,
        "in_hw": (8, 8),
        "out_hw": (8, 8),
    }
    if op is Op.CONV2D:
        fields.update(kernel=(3, 3), padding=(1, 1), out_channels=16)
    elif op is Op.LINEAR:
        fields.update(in_hw=(1, 1), out_hw=(1, 1), out_channels=4)
    elif op in (Op.ADD, Op.CONCAT):
        fields.update(inputs=["a", "b"], out_channels=8)
    elif op is Op.ADAPTIVE_AVGPOOL2D:
        fields.update(out_hw=(1, 1))
    layer = Layer.model_validate(fields)
    network, shape = isolated_network(layer)
    assert len(network.layers) == 1
    assert shape == ((8,) if op is Op.LINEAR else (4 if op is Op.CONCAT else 8, 8, 8))
    result = measure_layer(layer, get_backend("torch-cpu"), fast_protocol)
    assert result.median_ms > 0


def test_a_failing_configuration_becomes_a_failed_row(
    device: DeviceSpec, fast_protocol: TimingProtocol, unsplittable_concat: Layer
) -> None:
    odd = unsplittable_concat
    row = measure_sample(Sample.for_layer(odd, device), get_backend("torch-cpu"), fast_protocol)
    assert row.status == "failed"
    assert row.error is not None and "cannot be split evenly" in row.error
    assert row.median_ms is None and row.layer == odd


def test_in_context_on_onnxruntime_fails_cleanly(
    tiny_network: Network, fast_protocol: TimingProtocol
) -> None:
    device = DeviceSpec(hardware="test-cpu", backend="onnxruntime-cpu")
    sample = Sample.for_network(tiny_network, device, MeasurementKind.IN_CONTEXT)
    row = measure_sample(sample, get_backend("onnxruntime-cpu"), fast_protocol)
    assert row.status == "failed" and row.error is not None and "cannot time layers in context" in row.error


def test_sample_rows_carry_what_was_measured(
    tiny_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    sample = Sample.for_network(
        tiny_network, device, MeasurementKind.IN_CONTEXT, family="tiny", width_vector=[16, 32]
    )
    row = measure_sample(sample, get_backend("torch-cpu"), fast_protocol)
    assert row.status == "ok", row.error
    assert row.sample_key == sample.sample_key and row.family == "tiny" and row.width_vector == [16, 32]
    assert row.architecture == tiny_network
    assert row.per_layer is not None and len(row.per_layer) == len(tiny_network.layers)
    assert row.duration_s > 0


def test_network_rows_carry_the_speed_probe_and_isolated_layer_rows_do_not(
    tiny_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    probe = SpeedProbe()
    backend = get_backend("torch-cpu")
    network = measure_sample(
        Sample.for_network(tiny_network, device, MeasurementKind.NETWORK),
        backend,
        fast_protocol,
        probe=probe.run,
    )
    assert network.status == "ok", network.error
    assert network.probe_version == PROBE_VERSION
    assert network.probe_ms is not None and network.relative_latency is not None
    assert (
        network.median_ms is not None
        and 0.5 < network.relative_latency * network.probe_ms / network.median_ms < 2
    )
    in_context = measure_sample(
        Sample.for_network(tiny_network, device, MeasurementKind.IN_CONTEXT),
        backend,
        fast_protocol,
        probe=probe.run,
    )
    assert in_context.status == "ok" and in_context.probe_version == PROBE_VERSION
    layer = tiny_network.layers[0]
    isolated = measure_sample(Sample.for_layer(layer, device), backend, fast_protocol, probe=probe.run)
    assert isolated.status == "ok" and isolated.probe_ms is None and isolated.relative_latency is None
