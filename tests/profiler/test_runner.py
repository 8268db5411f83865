from __future__ import annotations

from pathlib import Path

import pytest

from lpnet.arch.ir import Layer, Network
from profiler.batch import Measurement, MeasurementKind
from profiler.device import DeviceSpec
from profiler.protocol import TimingProtocol
from profiler.runner import make_run_context, run_profile
from profiler.sampling import ListSampler, Sample, SamplingConfig, StratifiedSampler
from profiler.sinks import JsonlSink, MemorySink, read_jsonl

NET, CTX, ISO = MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT, MeasurementKind.ISOLATED
CONFIG = SamplingConfig(network_samples=3, in_context_samples=1, isolated_samples=3, seed=3)


class InterruptingSink(JsonlSink):
    """Behaves like Ctrl-C arriving while the (after+1)-th measurement is being handed over."""

    def __init__(self, path: Path, after: int) -> None:
        super().__init__(path)
        self.after = after
        self.writes = 0

    def write(self, measurement: Measurement) -> None:
        if self.writes == self.after:
            raise KeyboardInterrupt
        super().write(measurement)
        self.writes += 1


def sampler(
    networks: dict[str, Network], device: DeviceSpec, config: SamplingConfig = CONFIG
) -> StratifiedSampler:
    return StratifiedSampler(networks, device, config)


def test_a_run_measures_every_planned_sample_once(
    tiny_network: Network, tiny_mobile_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    sink = MemorySink()
    plan = sampler({"tiny": tiny_network, "tinymobile": tiny_mobile_network}, device)
    summary = run_profile(device, plan, sink, fast_protocol, progress=False)
    keys = [m.sample_key for m in sink.measurements]
    assert len(keys) == len(set(keys)) == 2 * (3 + 1 + 3)
    assert {k: (s.ok, s.failed) for k, s in summary.per_kind.items()} == {
        NET: (6, 0),
        CTX: (2, 0),
        ISO: (6, 0),
    }
    assert not summary.interrupted and not summary.failures
    assert {m.family for m in sink.measurements} == {"tiny", "tinymobile"}
    table = summary.format_table()
    assert "in_context" in table and "network" in table and "isolated" in table
    assert summary.to_dict()["per_kind"]["network"]["ok"] == 6  # type: ignore[index]
    # On the CPU the speed probe brackets every network sample, in context too; isolated layers go without.
    for m in sink.measurements:
        assert (m.probe_version is not None) == (m.kind is not ISO), m
        assert (m.relative_latency is not None) == (m.kind is not ISO), m


def test_a_run_without_the_speed_probe_has_no_probe_fields(
    tiny_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    sink = MemorySink()
    run_profile(
        device,
        sampler({"tiny": tiny_network}, device),
        sink,
        fast_protocol,
        progress=False,
        speed_probe=False,
    )
    assert sink.measurements
    assert all(m.probe_ms is None and m.relative_latency is None for m in sink.measurements)


def test_an_interrupted_run_resumes_without_duplicates(
    tmp_path: Path, tiny_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    path = tmp_path / "profile.jsonl"
    first = InterruptingSink(path, after=3)
    summary = run_profile(
        device, sampler({"tiny": tiny_network}, device), first, fast_protocol, progress=False
    )
    first.close()
    assert summary.interrupted
    assert summary.measured == 3  # the one in flight is lost, nothing else
    assert len(read_jsonl(path)[1]) == 3

    second = JsonlSink(path)
    summary = run_profile(
        device, sampler({"tiny": tiny_network}, device), second, fast_protocol, progress=False
    )
    second.close()
    assert not summary.interrupted
    assert summary.skipped == 3
    assert summary.measured == 7 - 3

    rows = read_jsonl(path)[1]
    keys = [m.sample_key for m in rows]
    expected = MemorySink()
    run_profile(device, sampler({"tiny": tiny_network}, device), expected, fast_protocol, progress=False)
    assert len(keys) == len(set(keys)) == 7
    assert set(keys) == expected.done_keys()


def test_a_failing_configuration_is_recorded_and_the_run_goes_on(
    tiny_network: Network,
    device: DeviceSpec,
    fast_protocol: TimingProtocol,
    unsplittable_concat: Layer,
) -> None:
    odd = unsplittable_concat
    samples = [
        Sample.for_layer(odd, device, family="x"),
        Sample.for_network(tiny_network, device, family="x"),
    ]
    sink = MemorySink()
    summary = run_profile(device, ListSampler(samples), sink, fast_protocol, progress=False)
    assert [m.status for m in sink.measurements] == ["failed", "ok"] or [
        m.status for m in sink.measurements
    ] == ["ok", "failed"]
    assert len(summary.failures) == 1 and "split evenly" in summary.failures[0].error
    assert "failed isolated" in summary.format_table()


def test_a_budget_ends_the_run(
    tiny_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    plan = sampler({"tiny": tiny_network}, device, SamplingConfig.for_budget(seed=1))
    sink = MemorySink()
    summary = run_profile(device, plan, sink, fast_protocol, budget_minutes=1.5 / 60, progress=False)
    assert summary.measured >= 3
    assert {m.kind for m in sink.measurements} == {NET, CTX, ISO}
    assert summary.seconds < 1.5 + 2.0  # at most one sample past the budget


def test_max_samples_and_backends_without_layer_timing(
    tiny_network: Network, fast_protocol: TimingProtocol
) -> None:
    device = DeviceSpec(hardware="test-cpu", backend="onnxruntime-cpu")
    sink = MemorySink()
    summary = run_profile(
        device, sampler({"tiny": tiny_network}, device), sink, fast_protocol, progress=False, max_samples=4
    )
    assert summary.measured == 4
    assert CTX not in {m.kind for m in sink.measurements}
    assert all(m.status == "ok" for m in sink.measurements)


def test_backend_must_match_the_device(tiny_network: Network, device: DeviceSpec) -> None:
    from profiler.backends import get_backend

    with pytest.raises(ValueError, match="does not match"):
        run_profile(
            device, ListSampler([]), MemorySink(), backend=get_backend("onnxruntime-cpu"), progress=False
        )


def test_run_context_records_backend_settings(device: DeviceSpec) -> None:
    context = make_run_context(device, TimingProtocol(), device.create_backend())
    assert context.environment.backend_settings["backend"] == "torch-cpu"
    assert context.environment.backend_settings["num_threads"] == 1
