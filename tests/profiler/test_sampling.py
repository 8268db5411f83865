from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from lpnet.arch.groups import channel_groups
from lpnet.arch.ir import Layer, Network, Op
from profiler.batch import MeasurementKind
from profiler.device import DeviceSpec
from profiler.sampling import ListSampler, Sample, SamplingConfig, StratifiedSampler, sample_key
from profiler.variation import latin_hypercube, scale_layer, widths_from_ratios

NET, CTX, ISO = MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT, MeasurementKind.ISOLATED


def drain(sampler: StratifiedSampler, bucket: tuple[str, MeasurementKind]) -> list[Sample]:
    out: list[Sample] = []
    while batch := sampler.next_batch(set(), size=5, bucket=bucket):
        out.extend(batch)
    return out


@pytest.fixture
def config() -> SamplingConfig:
    # Every width: the tiny network's groups have only a few multiples of 8.
    return SamplingConfig(
        network_samples=40, in_context_samples=3, isolated_samples=30, seed=7, channel_step=1
    )


def test_same_seed_same_samples_other_seed_other_samples(
    tiny_network: Network, device: DeviceSpec, config: SamplingConfig
) -> None:
    first = drain(StratifiedSampler({"tiny": tiny_network}, device, config), ("tiny", NET))
    again = drain(StratifiedSampler({"tiny": tiny_network}, device, config), ("tiny", NET))
    other = drain(
        StratifiedSampler(
            {"tiny": tiny_network}, device, SamplingConfig(network_samples=40, seed=8, channel_step=1)
        ),
        ("tiny", NET),
    )
    keys = [s.sample_key for s in first]
    assert keys == [s.sample_key for s in again]
    assert len(set(keys)) == len(keys) == 40
    assert (
        keys[:7] == [s.sample_key for s in other][:7]
    )  # unpruned + uniform points do not depend on the seed
    assert keys[7:] != [s.sample_key for s in other][7:]


def test_width_vectors_cover_the_ratio_range_and_respect_groups(
    tiny_network: Network, device: DeviceSpec, config: SamplingConfig
) -> None:
    groups = channel_groups(tiny_network)
    samples = drain(StratifiedSampler({"tiny": tiny_network}, device, config), ("tiny", NET))
    assert samples[0].origin == "unpruned"
    assert list(samples[0].width_vector or []) == [g.channels for g in groups]
    assert {s.origin for s in samples} == {"unpruned", "uniform", "lhs"}
    for sample in samples:
        assert sample.network is not None and sample.width_vector is not None
        assert [g.channels for g in channel_groups(sample.network)] == list(sample.width_vector)
        for width, group in zip(sample.width_vector, groups, strict=True):
            assert 1 <= width <= group.channels and width % group.divisor == 0
    ratios = np.array([s.keep_ratios for s in samples if s.origin == "lhs"])
    assert ratios.min() >= 0.1 and ratios.max() <= 1.0
    # Every tenth of the range is hit in every group.
    for column in ratios.T:
        assert len(set(np.floor((column - 0.1) / 0.09).astype(int).clip(0, 9))) >= 9


def test_sampled_widths_are_multiples_of_8_where_a_group_allows(device: DeviceSpec) -> None:
    import torchvision

    from lpnet.arch.from_torch import network_from_module

    network = network_from_module(torchvision.models.mobilenet_v2(), (1, 3, 64, 64), name="mobilenet_v2")
    groups = channel_groups(network)
    samples = drain(StratifiedSampler({"m": network}, device, SamplingConfig(network_samples=30)), ("m", NET))
    assert len({s.sample_key for s in samples}) == len(samples) == 30
    assert list(samples[0].width_vector or []) == [g.channels for g in groups]
    for sample in samples:
        for width, group in zip(sample.width_vector or [], groups, strict=True):
            step = 8 if group.channels % 8 == 0 else 1
            assert width % step == 0 and 1 <= width <= group.channels, (width, group.channels)
    # With a step of 1 the same ratios give unaligned widths too.
    every = drain(
        StratifiedSampler({"m": network}, device, SamplingConfig(network_samples=30, channel_step=1)),
        ("m", NET),
    )
    assert any(w % 8 for s in every for w in s.width_vector or [])


def test_latin_hypercube_hits_every_stratum_once() -> None:
    points = latin_hypercube(np.random.default_rng(0), 16, 5, 0.1, 1.0)
    strata = np.floor((points - 0.1) / (0.9 / 16)).astype(int)
    for column in strata.T:
        assert sorted(column) == list(range(16))


def test_widths_from_ratios_rounds_to_divisors() -> None:
    assert widths_from_ratios([0.5, 0.01, 1.0], [64, 64, 30], [1, 1, 4]) == [32, 1, 28]
    assert widths_from_ratios([0.1], [10], [5]) == [5]


def test_isolated_layers_start_with_the_network_layers_then_scale_them(
    tiny_network: Network, device: DeviceSpec, config: SamplingConfig
) -> None:
    sampler = StratifiedSampler({"tiny": tiny_network}, device, config)
    samples = drain(sampler, ("tiny", ISO))
    bases = sampler.base_layers("tiny")
    assert [s.layer for s in samples[: len(bases)]] == bases
    assert len(samples) == 30
    assert len({s.sample_key for s in samples}) == 30
    assert all(s.origin == "scaled" for s in samples[len(bases) :])
    ops = {s.layer.op for s in samples if s.layer is not None}
    assert {Op.CONV2D, Op.BATCHNORM2D, Op.LINEAR, Op.ADD} <= ops


def test_scaled_layers_stay_valid() -> None:
    def conv(cin: int, cout: int, groups: int = 1) -> Layer:
        return Layer(
            name="c",
            op=Op.CONV2D,
            inputs=["input"],
            in_channels=cin,
            out_channels=cout,
            in_hw=(8, 8),
            out_hw=(8, 8),
            kernel=(3, 3),
            padding=(1, 1),
            groups=groups,
        )

    depthwise = scale_layer(conv(32, 32, groups=32), 0.5, 0.9)
    assert depthwise is not None and depthwise.is_depthwise and depthwise.in_channels == 16
    grouped = scale_layer(conv(64, 128, groups=8), 0.5, 0.5)
    assert grouped is not None and (grouped.groups, grouped.in_channels, grouped.out_channels) == (4, 32, 64)
    stem = scale_layer(conv(3, 64), 0.3, 0.5)
    assert stem is not None and (stem.in_channels, stem.out_channels) == (3, 32)


def test_next_batch_skips_done_keys_and_never_repeats(
    tiny_network: Network, device: DeviceSpec, config: SamplingConfig
) -> None:
    full = drain(StratifiedSampler({"tiny": tiny_network}, device, config), ("tiny", NET))
    done = {s.sample_key for s in full[:10]}
    sampler = StratifiedSampler({"tiny": tiny_network}, device, config)
    seen: list[str] = []
    while batch := sampler.next_batch(done, size=4, bucket=("tiny", NET)):
        seen.extend(s.sample_key for s in batch)
    assert seen == [s.sample_key for s in full[10:]]
    assert sampler.skipped == 10
    assert sampler.next_batch(done, size=4, bucket=("tiny", NET)) == []


def test_scorer_hands_out_the_worst_predicted_first(
    tiny_network: Network, device: DeviceSpec, config: SamplingConfig
) -> None:
    def smallest_network_first(candidates: Sequence[Sample]) -> list[float]:
        return [-float(sum(c.width_vector or [])) for c in candidates]

    sampler = StratifiedSampler({"tiny": tiny_network}, device, config)
    first = sampler.next_batch(set(), size=2, bucket=("tiny", NET), scorer=smallest_network_first)
    pool = drain(StratifiedSampler({"tiny": tiny_network}, device, config), ("tiny", NET))[:8]
    expected = sorted(pool, key=lambda s: sum(s.width_vector or []))[:2]
    assert {s.sample_key for s in first} == {s.sample_key for s in expected}


def test_keys_depend_on_kind_configuration_and_device(tiny_network: Network, device: DeviceSpec) -> None:
    other_device = DeviceSpec(hardware="test-cpu", backend="onnxruntime-cpu")
    key = sample_key(NET, tiny_network.content_hash, device)
    assert key == sample_key(NET, tiny_network.content_hash, device)
    assert key != sample_key(CTX, tiny_network.content_hash, device)
    assert key != sample_key(NET, tiny_network.content_hash, other_device)
    assert key != sample_key(NET, tiny_network.content_hash, device, replicate=1)


def test_list_sampler_round_robins_over_buckets(
    tiny_network: Network, tiny_mobile_network: Network, device: DeviceSpec
) -> None:
    samples = [Sample.for_network(tiny_network, device), Sample.for_network(tiny_mobile_network, device)]
    sampler = ListSampler(samples)
    assert sampler.planned_total() == 2
    assert {s.sample_key for s in sampler.next_batch(set(), size=5)} == {s.sample_key for s in samples}


def test_unknown_family_is_reported(device: DeviceSpec) -> None:
    from profiler.errors import UnknownFamily

    with pytest.raises(UnknownFamily, match="unknown torchvision model"):
        StratifiedSampler.for_families(["resnet_nonexistent"], device)


def test_a_family_with_few_distinct_widths_runs_dry_instead_of_looping(device: DeviceSpec) -> None:
    from torch import nn

    from lpnet.arch.from_torch import network_from_module

    narrow = network_from_module(
        nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)),
        (1, 3, 8, 8),
        name="n",
    )
    sampler = StratifiedSampler({"n": narrow}, device, SamplingConfig(network_samples=1000, kinds=(NET,)))
    samples = drain(sampler, ("n", NET))
    widths = {s.width_vector for s in samples}
    assert len(widths) == len(samples) <= 2  # a 2-channel group keeps 1 or 2 channels
