"""Adaptive sampling: the generated networks a scorer ranks highest, from pools of profiling seeds."""

from __future__ import annotations

from lpnet.arch.counting import network_cost
from lpnet.arch.generator import PROFILING_SEEDS
from lpnet.arch.ir import Network
from profiler.adaptive import AdaptiveSampler
from profiler.batch import MeasurementKind
from profiler.device import DeviceSpec
from profiler.sampling import GENERATED_FAMILY, Sample, SamplingConfig, StratifiedSampler

NET, CTX = MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT
GENERATED = (GENERATED_FAMILY, NET)
POOL = 4


def macs(network: Network) -> float:
    return float(network_cost(network).macs)


def sample_macs(sample: Sample) -> float:
    assert sample.network is not None
    return macs(sample.network)


def stratified(device: DeviceSpec, networks: dict[str, Network] | None = None) -> StratifiedSampler:
    config = SamplingConfig(kinds=(NET, CTX), network_samples=50, in_context_samples=50, seed=3)
    return StratifiedSampler(networks or {}, device, config, generated_batch=1)


def picks(
    sampler: AdaptiveSampler, done: set[str], count: int, bucket: tuple[str, MeasurementKind]
) -> list[Sample]:
    return [sample for _ in range(count) for sample in sampler.next_batch(done, 1, bucket)]


def test_each_pick_is_the_best_scored_of_its_pool_of_profiling_seeds(device: DeviceSpec) -> None:
    chosen = picks(AdaptiveSampler(stratified(device), macs, pool=POOL), set(), 3, GENERATED)
    # The same seeded stream, read in pools of POOL: what the adaptive sampler chose from.
    plain = stratified(device)
    pools = [plain.next_batch(set(), POOL, GENERATED) for _ in range(3)]
    assert [s.sample_key for s in chosen] == [max(p, key=sample_macs).sample_key for p in pools]
    assert [s.sample_key for s in chosen] != [p[0].sample_key for p in pools]  # not the stream's order
    for sample in chosen:
        assert sample.network is not None and sample.family == GENERATED_FAMILY
        assert int(str(sample.network.name).removeprefix("gen-")) in PROFILING_SEEDS


def test_picks_are_deterministic_and_skip_what_is_measured(device: DeviceSpec) -> None:
    first = picks(AdaptiveSampler(stratified(device), macs, pool=POOL), set(), 3, GENERATED)
    again = picks(AdaptiveSampler(stratified(device), macs, pool=POOL), set(), 3, GENERATED)
    assert [s.sample_key for s in first] == [s.sample_key for s in again]

    # A rerun with the first pick measured never hands it out; the pools are drawn without it.
    done = {first[0].sample_key}
    resumed = AdaptiveSampler(stratified(device), macs, pool=POOL)
    rerun = picks(resumed, done, 3, GENERATED)
    assert done.isdisjoint(s.sample_key for s in rerun)
    assert resumed.skipped == 1 and resumed.passed_over == 3 * (POOL - 1)


def test_a_lower_score_is_passed_over_in_context_too(device: DeviceSpec) -> None:
    def fewest_macs(network: Network) -> float:
        return -macs(network)

    chosen = picks(
        AdaptiveSampler(stratified(device), fewest_macs, pool=POOL), set(), 2, (GENERATED_FAMILY, CTX)
    )
    plain = stratified(device)
    pools = [plain.next_batch(set(), POOL, (GENERATED_FAMILY, CTX)) for _ in range(2)]
    assert [s.sample_key for s in chosen] == [min(p, key=sample_macs).sample_key for p in pools]


def test_other_buckets_come_as_the_wrapped_sampler_has_them(
    tiny_network: Network, device: DeviceSpec
) -> None:
    adaptive = AdaptiveSampler(stratified(device, {"tiny": tiny_network}), macs, pool=POOL)
    plain = stratified(device, {"tiny": tiny_network})
    assert adaptive.buckets() == plain.buckets()
    assert adaptive.adaptive_buckets == {GENERATED, (GENERATED_FAMILY, CTX)}
    tiny = [s.sample_key for s in picks(adaptive, set(), 5, ("tiny", NET))]
    assert tiny == [s.sample_key for s in plain.next_batch(set(), 5, ("tiny", NET))]
    # The plan counts one sample per pool in the adaptive buckets.
    assert adaptive.planned_total([GENERATED]) == -(-50 // POOL)
    assert adaptive.planned_total([("tiny", NET)]) == 50
    # Without a bucket, the buckets take turns.
    mixed = [sample for _ in adaptive.buckets() for sample in adaptive.next_batch(set())]
    assert {s.bucket for s in mixed} == set(adaptive.buckets())
