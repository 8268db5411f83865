"""Transformer-style generated networks: determinism, the three layouts, cost bounds, that they run."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lpnet.arch.build import build_module
from lpnet.arch.counting import network_cost
from lpnet.arch.generator import PROFILING_FAMILY, TRANSFORMER_SEEDS, generate_network, seed_family
from lpnet.arch.generator.transformer import (
    DEFAULT_TRANSFORMER_SPACE,
    TransformerSpace,
    generate_transformer,
)
from lpnet.arch.ir import Network, Op
from lpnet.errors import GenerationError

SEEDS = TRANSFORMER_SEEDS[:40]


@pytest.fixture(scope="module")
def sample() -> list[Network]:
    return [generate_network(seed) for seed in SEEDS]


def _layout(network: Network) -> str:
    ops = {layer.op for layer in network.layers}
    if Op.TOKENS in ops:
        return "global"
    return "windowed" if Op.SPACE_TO_DEPTH in ops or network.layers[1].op is Op.LAYERNORM else "hybrid"


def test_same_seed_same_network_and_seeds_differ() -> None:
    seed = TRANSFORMER_SEEDS.start + 7
    assert generate_network(seed) == generate_network(seed)
    assert generate_network(seed) != generate_network(seed + 1)


def test_transformer_seeds_are_profiling_material(sample: list[Network]) -> None:
    assert seed_family(TRANSFORMER_SEEDS.start) == PROFILING_FAMILY
    assert {n.family for n in sample} == {PROFILING_FAMILY}
    assert all(n.name == f"gen-{seed}" for n, seed in zip(sample, SEEDS, strict=True))


def test_every_network_has_attention_and_layer_norm_and_every_layout_appears(sample: list[Network]) -> None:
    for network in sample:
        ops = Counter(layer.op for layer in network.layers)
        assert ops[Op.ATTENTION] >= 1 and ops[Op.LAYERNORM] >= 2 * ops[Op.ATTENTION], network.name
    assert {_layout(n) for n in sample} == {"global", "windowed", "hybrid"}
    attention = [layer for n in sample for layer in n.layers if layer.op is Op.ATTENTION]
    assert any(layer.shift != (0, 0) for layer in attention)  # shifted windows
    assert any(layer.dilation != (1, 1) for layer in attention)  # grid attention
    assert any(layer.kernel[0] == 1 and layer.kernel == layer.in_hw for layer in attention)  # global
    assert any(layer.op is Op.CLASS_TOKEN for n in sample for layer in n.layers)


def test_every_network_is_within_the_cost_bounds(sample: list[Network]) -> None:
    space = DEFAULT_TRANSFORMER_SPACE
    for network in sample:
        assert space.min_macs <= network_cost(network).macs <= space.max_macs, network.name
        assert space.resolution[0] <= network.input_shape[2] <= space.resolution[1]


def test_a_tighter_space_rescales_the_same_seed_into_its_bounds() -> None:
    seed = next(s for s in SEEDS if network_cost(generate_network(s)).macs > 4e8)
    tight = TransformerSpace(max_macs=1.5e8)
    network = generate_transformer(seed, "small", PROFILING_FAMILY, tight)
    assert network_cost(network).macs <= 1.5e8


def test_unreachable_bounds_fail_with_a_named_error() -> None:
    impossible = TransformerSpace(min_macs=1e12, max_macs=2e12)
    with pytest.raises(GenerationError, match="outside its bounds"):
        generate_transformer(SEEDS.start, "huge", PROFILING_FAMILY, impossible)


def test_transformer_networks_build_and_run(sample: list[Network]) -> None:
    for network in sample[:: len(sample) // 8]:
        module = build_module(network)
        with torch.inference_mode():
            out = module(torch.zeros(network.input_shape))
        assert out.shape == (1, network.layers[-1].out_channels), network.name
        assert torch.isfinite(out).all(), network.name
