"""The seeded architecture generator: determinism, coverage of the design space, cost bounds, the seed split."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from lpnet.arch.build import build_module
from lpnet.arch.counting import network_cost
from lpnet.arch.generator import (
    DEFAULT_SPACE,
    DEVELOPMENT_FAMILY,
    DEVELOPMENT_SEEDS,
    EVALUATION_FAMILY,
    EVALUATION_SEEDS,
    PROFILING_FAMILY,
    PROFILING_SEEDS,
    TRANSFORMER_SEEDS,
    BlockKind,
    DesignSpace,
    generate_network,
    generate_networks,
    seed_family,
)
from lpnet.arch.ir import ACTIVATIONS, NETWORK_INPUT, Layer, Network, Op
from lpnet.errors import GenerationError, LpnetError

REPO_ROOT = Path(__file__).resolve().parents[2]
COVERAGE_SEEDS = range(200)


@pytest.fixture(scope="module")
def sample() -> list[Network]:
    return generate_networks(PROFILING_SEEDS, len(COVERAGE_SEEDS))


def _convs(networks: list[Network]) -> list[Layer]:
    return [layer for net in networks for layer in net.layers if layer.op is Op.CONV2D]


def _feature_elements(network: Network) -> int:
    return sum(layer.out_channels * layer.out_hw[0] * layer.out_hw[1] for layer in network.layers)


# ---- determinism ----------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_network() -> None:
    for seed in (0, 7, 123_456, EVALUATION_SEEDS[42]):
        first, second = generate_network(seed), generate_network(seed)
        assert first.content_hash == second.content_hash
        assert first == second


def test_same_seed_gives_the_same_network_in_another_process() -> None:
    seeds = [3, 99, EVALUATION_SEEDS[5]]
    code = (
        "from lpnet.arch.generator import generate_network\n"
        f"print(' '.join(generate_network(s).content_hash for s in {seeds}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == [generate_network(s).content_hash for s in seeds]


def test_different_seeds_give_different_networks() -> None:
    hashes = {generate_network(seed).content_hash for seed in range(50)}
    assert len(hashes) >= 49


# ---- coverage of the design space ----------------------------------------------------------------------


def test_every_block_kind_appears(sample: list[Network]) -> None:
    seen: Counter[str] = Counter()
    for net in sample:
        scopes = {layer.name.split(".")[1] for layer in net.layers if layer.name.startswith("stage")}
        seen.update({kind.value for kind in BlockKind for scope in scopes if scope.startswith(kind.value)})
    assert set(seen) == {kind.value for kind in BlockKind}
    assert min(seen.values()) >= 10, seen


def test_block_structures_appear(sample: list[Network]) -> None:
    convs = _convs(sample)
    by_op = Counter(op for net in sample for op, n in net.op_counts().items() for _ in range(n))
    # residual adds, squeeze-excitation muls, Inception and DenseNet concats, pooling inside stages
    assert by_op[Op.ADD.value] > 100
    assert by_op[Op.MUL.value] > 20
    concats = [layer for net in sample for layer in net.layers if layer.op is Op.CONCAT]
    assert any(len(layer.inputs) >= 4 for layer in concats)  # DenseNet: all earlier features
    inner_pools = [
        layer
        for net in sample
        for layer in net.layers
        if layer.op in (Op.MAXPOOL2D, Op.AVGPOOL2D) and layer.name.startswith("stage")
    ]
    assert {layer.op for layer in inner_pools} == {Op.MAXPOOL2D, Op.AVGPOOL2D}
    assert any(layer.stride == (1, 1) for layer in inner_pools)  # Inception's pool branch
    # squeeze-excitation: the second input of a mul is a sigmoid or hardsigmoid gate at 1x1
    gates = {net.by_name[layer.inputs[1]].op for net in sample for layer in net.layers if layer.op is Op.MUL}
    assert gates == {Op.SIGMOID, Op.HARDSIGMOID}
    # bottleneck expansion 4: a 1x1 conv that widens a stage's channels four times into an add
    assert any(c.kernel == (1, 1) and c.out_channels == 4 * c.in_channels for c in convs)
    assert any(c.bias for c in convs if c.out_hw != (1, 1))  # plain stacks without batch norm


def test_conv_configurations_appear(sample: list[Network]) -> None:
    convs = _convs(sample)
    assert {c.kernel for c in convs} >= {(1, 1), (3, 3), (5, 5), (7, 7), (1, 7), (7, 1)}
    assert {c.stride for c in convs} == {(1, 1), (2, 2)}
    assert any(c.dilation == (2, 2) for c in convs)
    depthwise = [c for c in convs if c.is_depthwise]
    grouped = [c for c in convs if 1 < c.groups < c.in_channels]
    assert len(depthwise) > 100
    assert len(grouped) > 20
    assert {c.groups for c in grouped} >= {2, 4, 8, 16, 32}
    # RegNet-style: many narrow groups (8 channels each, more groups than any drawn count).
    assert any(c.in_channels // c.groups == 8 and c.groups > 32 for c in grouped)
    assert all(c.in_channels % c.groups == 0 and c.out_channels % c.groups == 0 for c in grouped)


def test_every_activation_appears(sample: list[Network]) -> None:
    ops = {layer.op for net in sample for layer in net.layers}
    assert ACTIVATIONS <= ops
    # The generator builds CNNs of the classic operators; the data-movement and channel-normalising
    # ops (ShuffleNet's, ConvNeXt's) and the transformers' token ops are not in its design space.
    not_generated = {Op.LRN, Op.PAD, Op.SOFTMAX, Op.CHANNEL_SHUFFLE, Op.SLICE, Op.LAYERNORM}
    not_generated |= {Op.UPSAMPLE_NEAREST, Op.UPSAMPLE_BILINEAR}
    not_generated |= {Op.TOKENS, Op.CLASS_TOKEN, Op.POSITION_EMBEDDING, Op.ATTENTION, Op.TOKEN_SELECT}
    not_generated |= {Op.SPACE_TO_DEPTH}
    assert ops == set(Op) - not_generated


def test_inputs_channels_and_depth_span_the_space(sample: list[Network]) -> None:
    low, high = DEFAULT_SPACE.resolution
    sides = [side for net in sample for side in net.input_shape[2:]]
    assert low <= min(sides) <= low + 16 and high - 16 <= max(sides) <= high
    assert sum(net.input_shape[2] != net.input_shape[3] for net in sample) >= 10
    assert any(side % 8 for side in sides)
    assert all(net.input_shape[:2] == (1, 3) for net in sample)

    channels = [c.out_channels for c in _convs(sample)]
    assert min(channels) == 8 and max(channels) == 2048
    assert 0 < sum(c % 8 != 0 for c in channels) < len(channels) / 4

    stages = Counter(
        len({layer.name.split(".")[0] for layer in net.layers if layer.name.startswith("stage")})
        for net in sample
    )
    assert set(stages) == {2, 3, 4, 5}


def test_stems_with_and_without_downsampling(sample: list[Network]) -> None:
    full_resolution = 0
    for net in sample:
        first_stage = next(layer for layer in net.layers if layer.name.startswith("stage"))
        if first_stage.in_hw == net.input_shape[2:] and first_stage.op is Op.CONV2D:
            full_resolution += 1
    stem_pools = sum(any(layer.name.startswith("stem.maxpool") for layer in net.layers) for net in sample)
    stem_strides = Counter(net.layers[0].stride for net in sample)
    assert full_resolution >= 5
    assert 20 <= stem_pools <= 180
    assert stem_strides[(1, 1)] >= 20 and stem_strides[(2, 2)] >= 100


def test_classifier_head(sample: list[Network]) -> None:
    for net in sample:
        ops = [net.by_name[name].op for name in net.outputs]
        assert ops == [Op.LINEAR]
        assert [layer.op for layer in net.layers if layer.op is Op.FLATTEN] == [Op.FLATTEN]
        flatten = next(layer for layer in net.layers if layer.op is Op.FLATTEN)
        assert net.by_name[flatten.inputs[0]].op is Op.ADAPTIVE_AVGPOOL2D
        assert net.layers[0].inputs == [NETWORK_INPUT]
    assert {net.layers[-1].out_channels for net in sample} == {10, 100, 1000}


def test_some_classifiers_flatten_a_pooled_map_through_wide_linears(sample: list[Network]) -> None:
    flattened = 0
    for net in sample:
        flatten = next(layer for layer in net.layers if layer.op is Op.FLATTEN)
        pool = net.by_name[flatten.inputs[0]]
        linears = [layer for layer in net.layers if layer.op is Op.LINEAR]
        assert linears[0].in_channels == pool.out_channels * pool.out_hw[0] * pool.out_hw[1]
        assert linears[0].in_channels * linears[0].out_channels <= max(
            DEFAULT_SPACE.max_head_params, 2048 * 1000
        )
        if pool.out_hw != (1, 1):
            flattened += 1
            assert 1 < pool.out_hw[0] <= max(DEFAULT_SPACE.flatten_sides)
            assert 2 <= len(linears) <= 3  # one or two hidden linears, then the classes
            assert linears[0].out_channels >= 8 * DEFAULT_SPACE.flatten_hidden[0] or (
                linears[0].in_channels * 8 * DEFAULT_SPACE.flatten_hidden[0] > DEFAULT_SPACE.max_head_params
            )
    # about flatten_head_prob of the networks, and never most of them
    assert 0.04 * len(sample) <= flattened <= 0.3 * len(sample)


# ---- the cost guard ------------------------------------------------------------------------------------


def test_every_network_is_within_the_cost_bounds(sample: list[Network]) -> None:
    macs = [network_cost(net).macs for net in sample]
    assert all(DEFAULT_SPACE.min_macs <= m <= DEFAULT_SPACE.max_macs for m in macs)
    assert all(_feature_elements(net) <= DEFAULT_SPACE.max_feature_elements for net in sample)
    # spread over the range rather than piled up at either bound
    assert min(macs) < 5 * DEFAULT_SPACE.min_macs and max(macs) > DEFAULT_SPACE.max_macs / 2
    assert sum(m > 0.75 * DEFAULT_SPACE.max_macs for m in macs) < len(macs) / 10


def test_a_tighter_space_shrinks_the_same_seeds_into_its_bounds() -> None:
    space = DesignSpace(min_macs=1e7, budget_floor_macs=5e7, max_macs=1e8, max_feature_elements=5e6)
    for seed in range(40):
        net = generate_network(seed, space)
        assert space.min_macs <= network_cost(net).macs <= space.max_macs
        assert _feature_elements(net) <= space.max_feature_elements


def test_a_plan_with_more_weights_than_any_network_may_have_is_narrowed() -> None:
    # Stages of 7x7 basic blocks growing to 2048 channels: realised at full width they exceed the
    # IR's weight bound (MAX_PARAMS), which the guard meets by narrowing, as it meets too many MACs.
    space = DesignSpace(
        stages=(5, 5),
        first_stage_channels=(128, 128),
        stage_growth=(2.5, 2.5),
        primary_kind_prob=1.0,
        block_kinds=((BlockKind.BASIC, 1.0),),
        blocks_per_stage=(4, 4),
        kernels=((7, 1.0),),
    )
    for seed in range(3):
        net = generate_network(seed, space)
        assert space.min_macs <= network_cost(net).macs <= space.max_macs


def test_unreachable_bounds_fail_after_bounded_attempts() -> None:
    space = DesignSpace(
        resolution=(96, 96),
        channels=(8, 16),
        min_macs=5e9,
        budget_floor_macs=6e9,
        max_macs=1e10,
        guard_attempts=10,
    )
    with pytest.raises(GenerationError, match="gen-0.*widen the design space") as excinfo:
        generate_network(0, space)
    assert isinstance(excinfo.value, LpnetError)


@pytest.mark.parametrize(
    "fields",
    [{"resolution": (320, 96)}, {"min_macs": 2e8, "budget_floor_macs": 1e8}, {"guard_attempts": 0}],
)
def test_inconsistent_design_space_is_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="DesignSpace"):
        DesignSpace(**fields)


# ---- built modules run ---------------------------------------------------------------------------------


def test_generated_networks_build_and_run() -> None:
    seeds = [*range(0, 200, 20), *range(EVALUATION_SEEDS.start, EVALUATION_SEEDS.start + 100, 10)]
    for seed in seeds:
        net = generate_network(seed)
        module = build_module(net)
        with torch.inference_mode():
            out = module(torch.zeros(net.input_shape))
        assert out.shape == (1, net.layers[-1].out_channels), net.name
        assert torch.isfinite(out).all(), net.name


# ---- the profiling / evaluation split ------------------------------------------------------------------


def test_seed_ranges_are_disjoint_and_name_their_family() -> None:
    assert PROFILING_SEEDS.stop <= EVALUATION_SEEDS.start
    assert not set(range(PROFILING_SEEDS.stop - 5, PROFILING_SEEDS.stop)) & set(EVALUATION_SEEDS)
    profiling = generate_networks(range(10, 20), 3)
    evaluation = generate_networks(EVALUATION_SEEDS, 3)
    assert [n.name for n in profiling] == ["gen-10", "gen-11", "gen-12"]
    assert {n.family for n in profiling} == {PROFILING_FAMILY}
    assert [n.name for n in evaluation] == [f"gen-{EVALUATION_SEEDS.start + i}" for i in range(3)]
    assert {n.family for n in evaluation} == {EVALUATION_FAMILY}
    assert PROFILING_FAMILY != EVALUATION_FAMILY


@pytest.mark.parametrize(
    "seeds",
    [
        range(PROFILING_SEEDS.stop - 2, EVALUATION_SEEDS.start + 2),  # straddles both
        range(PROFILING_SEEDS.stop - 2, PROFILING_SEEDS.stop + 2),  # runs past the profiling seeds
        range(EVALUATION_SEEDS.stop, EVALUATION_SEEDS.stop + 10),  # beyond both
        range(0, 100, 2),  # not step 1
    ],
)
def test_generate_networks_refuses_seeds_outside_one_range(seeds: range) -> None:
    with pytest.raises(GenerationError, match="must be a step-1 range inside"):
        generate_networks(seeds, 1)


def test_generate_networks_refuses_more_networks_than_seeds() -> None:
    with pytest.raises(GenerationError, match="hold only 5"):
        generate_networks(range(0, 5), 6)


@pytest.mark.parametrize(
    "seed", [-1, PROFILING_SEEDS.stop, EVALUATION_SEEDS.stop, DEVELOPMENT_SEEDS.stop, TRANSFORMER_SEEDS.stop]
)
def test_generate_network_refuses_seeds_outside_every_range(seed: int) -> None:
    with pytest.raises(GenerationError, match="none of the seed ranges"):
        generate_network(seed)


def test_each_seed_range_has_its_own_family_and_the_ranges_do_not_overlap() -> None:
    ranges = {
        PROFILING_FAMILY: PROFILING_SEEDS,
        EVALUATION_FAMILY: EVALUATION_SEEDS,
        DEVELOPMENT_FAMILY: DEVELOPMENT_SEEDS,
    }
    for family, seeds in ranges.items():
        assert generate_network(seeds.start).family == family
        assert seed_family(seeds.stop - 1) == family
    assert seed_family(TRANSFORMER_SEEDS.start) == PROFILING_FAMILY
    bounds = sorted((seeds.start, seeds.stop) for seeds in [*ranges.values(), TRANSFORMER_SEEDS])
    assert all(stop <= start for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False))
