from __future__ import annotations

from itertools import islice

from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.ir import Network, Op
from profiler.batch import MeasurementKind
from profiler.device import DeviceSpec
from profiler.kind_coverage import TARGET_ROWS, KindCoverage, coverage_ordered
from profiler.sampling import (
    GENERATED_FAMILY,
    TRANSFORMER_EVERY,
    TRANSFORMER_FAMILY,
    SamplingConfig,
    StratifiedSampler,
)


def plain(name: str) -> Network:
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    return network_from_module(module, (1, 3, 8, 8), name=name)


def grouped(name: str) -> Network:
    module = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.SiLU(), nn.AvgPool2d(2))
    return network_from_module(module, (1, 8, 8, 8), name=name)


def test_gain_counts_layers_of_kinds_under_the_target_only() -> None:
    coverage = KindCoverage()
    assert coverage.gain(plain("a")) == 3
    for _ in range(TARGET_ROWS):
        coverage.add(plain("a"))
    assert coverage.gain(plain("b")) == 0
    assert coverage.gain(grouped("c")) == 3


def test_thinly_covered_kinds_come_first_and_nothing_is_dropped() -> None:
    stream = [plain(f"p{i}") for i in range(5)] + [grouped("g0")] + [plain(f"q{i}") for i in range(3)]
    covered = KindCoverage([plain("seen")] * TARGET_ROWS)
    ordered = [n.name for n in coverage_ordered(stream, covered, window=8)]
    assert ordered[0] == "g0"
    assert sorted(ordered) == sorted(n.name for n in stream)
    # Once every candidate adds nothing, the stream's own order is kept.
    assert [name for name in ordered if name != "g0"] == [n.name for n in stream if n.name != "g0"]


def test_a_window_of_one_keeps_the_stream_order() -> None:
    stream = [plain("a"), grouped("b"), plain("c")]
    assert [n.name for n in coverage_ordered(stream, KindCoverage(), window=1)] == ["a", "b", "c"]


def test_in_context_generated_networks_are_ordered_by_coverage_and_deterministic(device: DeviceSpec) -> None:
    config = SamplingConfig(kinds=(MeasurementKind.IN_CONTEXT,), in_context_samples=6, seed=3)

    def first_six() -> list[str]:
        sampler = StratifiedSampler({}, device, config, generated_batch=1)
        bucket = (GENERATED_FAMILY, MeasurementKind.IN_CONTEXT)
        return [s.sample_key for s in sampler.next_batch(set(), size=6, bucket=bucket)]

    keys = first_six()
    assert keys == first_six()
    sampler = StratifiedSampler({}, device, config, generated_batch=1)
    plain_order = [n.name for n in islice(sampler.generated_networks(MeasurementKind.IN_CONTEXT), 6)]
    ordered = [
        n.name
        for n in islice(
            coverage_ordered(sampler.generated_networks(MeasurementKind.IN_CONTEXT), KindCoverage()), 6
        )
    ]
    assert ordered != plain_order
    # The first network taken adds at least as many thinly covered rows as any in its window.
    window = list(islice(sampler.generated_networks(MeasurementKind.IN_CONTEXT), 12))
    gains = {n.name: KindCoverage().gain(n) for n in window}
    assert gains[ordered[0]] == max(gains.values())


def test_transformer_networks_are_offered_in_context_and_taken_while_attention_is_thin(
    device: DeviceSpec,
) -> None:
    config = SamplingConfig(kinds=(MeasurementKind.IN_CONTEXT,), seed=3)
    sampler = StratifiedSampler({}, device, config, generated_batch=1, transformers=True)
    candidates = list(islice(sampler.in_context_candidates(), 3 * (TRANSFORMER_EVERY + 1)))
    has_attention = [any(layer.op is Op.ATTENTION for layer in n.layers) for n in candidates]
    assert has_attention == ([False] * (TRANSFORMER_EVERY - 1) + [True, False]) * 3
    cnns = [n.name for n, a in zip(candidates, has_attention, strict=True) if not a]
    assert cnns == [n.name for n in islice(sampler.generated_networks(MeasurementKind.IN_CONTEXT), len(cnns))]
    # With no attention timed yet, the first transformer offered is taken as soon as it is in the window.
    taken = list(islice(coverage_ordered(sampler.in_context_candidates(), KindCoverage()), 6))
    assert any(layer.op is Op.ATTENTION for n in taken for layer in n.layers)
    # Whole networks and isolated layers stay CNNs: no attention outside the in-context stream.
    whole = islice(sampler.generated_networks(MeasurementKind.NETWORK), 20)
    assert not any(layer.op is Op.ATTENTION for n in whole for layer in n.layers)


def test_only_the_transformer_family_offers_transformers(device: DeviceSpec) -> None:
    config = SamplingConfig(kinds=(MeasurementKind.IN_CONTEXT,), seed=3)
    plain_sampler = StratifiedSampler.for_families([GENERATED_FAMILY], device, config)
    with_transformers = StratifiedSampler.for_families([TRANSFORMER_FAMILY], device, config)
    assert not plain_sampler.transformers and with_transformers.transformers
    assert with_transformers.generated_batch == 1
    count = 2 * TRANSFORMER_EVERY

    def attention_networks(sampler: StratifiedSampler) -> int:
        candidates = islice(sampler.in_context_candidates(), count)
        return sum(any(layer.op is Op.ATTENTION for layer in n.layers) for n in candidates)

    assert attention_networks(plain_sampler) == 0
    assert attention_networks(with_transformers) == 1
    bucket = (GENERATED_FAMILY, MeasurementKind.IN_CONTEXT)
    keys = [s.sample_key for s in with_transformers.next_batch(set(), size=4, bucket=bucket)]
    assert keys == [
        s.sample_key
        for s in StratifiedSampler.for_families([TRANSFORMER_FAMILY], device, config).next_batch(
            set(), size=4, bucket=bucket
        )
    ]
