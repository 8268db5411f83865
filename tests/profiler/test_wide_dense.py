"""The wide_dense family: dense convolutions on either side of a CPU's last-level cache."""

from __future__ import annotations

from collections.abc import Sequence

from lpnet.arch.ir import Layer, Op
from profiler.batch import MeasurementKind
from profiler.coverage import SYNTHETIC_FAMILIES
from profiler.device import DeviceSpec
from profiler.family_names import WIDE_DENSE_FAMILY
from profiler.sampling import DEFAULT_FAMILIES, SamplingConfig, StratifiedSampler
from profiler.wide_dense import wide_dense_network
from service.agents.tasks import check_families
from service.schemas.common import FIRST_RUN_FAMILIES

MB = 2**20


def _dense_weight_mb(layers: Sequence[Layer]) -> list[float]:
    return [
        layer.in_channels * layer.out_channels * layer.kernel[0] * layer.kernel[1] * 4 / MB
        for layer in layers
        if layer.op is Op.CONV2D and layer.groups == 1 and layer.kernel == (3, 3)
    ]


def test_its_widest_convolutions_hold_more_weights_than_common_caches_at_a_7x7_map() -> None:
    network = wide_dense_network()
    wide = [layer for layer in network.layers if layer.op is Op.CONV2D and layer.in_channels >= 1024]
    assert [layer.out_hw for layer in wide] == [(7, 7)] * 3
    assert [round(mb) for mb in _dense_weight_mb(wide)] == [36, 54, 81]
    assert SYNTHETIC_FAMILIES[WIDE_DENSE_FAMILY] is wide_dense_network
    check_families([WIDE_DENSE_FAMILY, "resnet18"])  # a campaign may name it
    check_families(FIRST_RUN_FAMILIES)  # and the first run profiles it
    assert WIDE_DENSE_FAMILY in FIRST_RUN_FAMILIES and WIDE_DENSE_FAMILY in DEFAULT_FAMILIES


def test_its_first_width_variants_put_the_widest_convolution_on_both_sides_of_32_mb(
    device: DeviceSpec,
) -> None:
    sampler = StratifiedSampler.for_families(
        [WIDE_DENSE_FAMILY],
        device,
        SamplingConfig(network_samples=8, in_context_samples=0, isolated_samples=0),
    )
    samples = sampler.next_batch(set(), size=8, bucket=(WIDE_DENSE_FAMILY, MeasurementKind.NETWORK))
    widest = [max(_dense_weight_mb(s.network.layers)) for s in samples if s.network is not None]
    assert len(widest) == 8
    assert any(mb > 40 for mb in widest) and any(mb < 24 for mb in widest)
