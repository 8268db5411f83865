"""The plan of a network: every random choice a seed makes, before widths and resolution are fixed.

Every draw is built on `random.Random.random()`, whose sequence Python keeps stable, so a seed plans
the same network on every run and Python version.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from lpnet.arch.generator.space import BlockKind, DesignSpace, T, Weighted
from lpnet.arch.ir import Op


class Draw:
    """Draws built only on `random.Random.random()`, whose sequence is stable across Python versions."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._rng.random()

    def integer(self, low: int, high: int) -> int:
        """Uniform over low..high inclusive."""
        return low + min(int(self._rng.random() * (high - low + 1)), high - low)

    def chance(self, probability: float) -> bool:
        return self._rng.random() < probability

    def pick(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def weighted(self, options: Weighted[T]) -> T:
        point = self._rng.random() * sum(weight for _, weight in options)
        for value, weight in options:
            point -= weight
            if point < 0:
                return value
        return options[-1][0]


@dataclass(frozen=True)
class SqueezePlan:
    reduction: int
    activation: Op
    gate: Op  # sigmoid or hardsigmoid


@dataclass(frozen=True)
class BlockPlan:
    kernel: int
    dilation: int = 1
    expansion: float = 1.0  # inverted: hidden = in * expansion
    branches: tuple[str, ...] = ()  # inception branch kinds


@dataclass(frozen=True)
class StagePlan:
    kind: BlockKind
    channels: float  # before width scaling
    odd_channels: bool
    halve: bool
    pool: Op | None  # the pool that halves the resolution, or None for a stride-2 conv
    activation: Op
    blocks: tuple[BlockPlan, ...]
    squeeze: SqueezePlan | None = None
    groups: int = 1  # drawn group count of the spatial convs (1: dense)
    group_width: int = 0  # drawn channels per group of the spatial convs instead (0: a count)
    separable: bool = False
    batchnorm: bool = True
    growth: int = 0  # dense growth rate before width scaling


@dataclass(frozen=True)
class Plan:
    height: int
    width: int
    stem_channels: float
    stem_kernel: int
    stem_stride: int
    deep_stem: bool
    stem_pool: bool
    stem_activation: Op
    stages: tuple[StagePlan, ...]
    head_channels: float | None
    hidden_features: tuple[int, ...]  # the classifier's hidden linears, in order
    head_pool: int  # side of the map the classifier flattens: 1 is the global mean
    head_activation: Op
    classes: int
    macs_budget: float


def draw_plan(draw: Draw, space: DesignSpace) -> Plan:
    height = 8 * draw.integer(-(-space.resolution[0] // 8), space.resolution[1] // 8)
    width = height
    if draw.chance(space.non_square_prob):
        width = 8 * round(height * draw.pick((0.75, 1.25, 1.5)) / 8)
    if draw.chance(space.odd_resolution_prob):
        height, width = height + draw.pick((-1, 1)), width + draw.pick((-1, 1))
    height, width = (min(max(side, space.resolution[0]), space.resolution[1]) for side in (height, width))
    main_activation = draw.weighted(space.activations)
    primary = draw.weighted(space.block_kinds)
    deep_stem = draw.chance(space.deep_stem_prob)
    stem_kernel = 3 if deep_stem else draw.pick((3, 3, 5, 7))
    stem_stride = 2 if draw.chance(space.stem_stride2_prob) else 1
    stem_pool = draw.chance(space.stem_maxpool_prob)
    stem_channels = draw.uniform(*space.stem_channels)
    channels = draw.uniform(*space.first_stage_channels)
    stages = []
    for index in range(draw.integer(*space.stages)):
        kind = primary if draw.chance(space.primary_kind_prob) else draw.weighted(space.block_kinds)
        activation = main_activation
        if draw.chance(space.stage_activation_prob):
            activation = draw.weighted(space.activations)
        if index == 0:  # rarely halves again after a stem that already divides the input by 4
            halve = draw.chance(0.3 if stem_stride == 2 and stem_pool else 0.6)
        else:
            halve = draw.chance(space.stage_stride2_prob)
            channels *= draw.uniform(*space.stage_growth)
        stages.append(_draw_stage(draw, space, kind, channels, halve, activation))
    head_channels = None  # MobileNet's last 1x1 conv widens 1.5-4 times (320 -> 1280)
    if draw.chance(space.head_conv_prob):
        head_channels = channels * draw.uniform(1.5, 4.0)
    hidden_features = None
    if draw.chance(space.hidden_linear_prob):
        hidden_features = 8 * draw.integer(16, 256)
    stem_activation = draw.weighted(space.activations) if draw.chance(0.2) else main_activation
    classes = draw.weighted(space.classes)
    macs_budget = math.exp(draw.uniform(math.log(space.budget_floor_macs), math.log(space.max_macs)))
    # Drawn last, so that the draws before it make the same plan as a space without flattened heads.
    hidden: tuple[int, ...] = (hidden_features,) if hidden_features is not None else ()
    head_pool = 1
    if draw.chance(space.flatten_head_prob):
        head_pool = draw.pick(space.flatten_sides)
        hidden = (8 * draw.integer(*space.flatten_hidden),) * draw.integer(1, 2)
    return Plan(
        height=height,
        width=width,
        stem_channels=stem_channels,
        stem_kernel=stem_kernel,
        stem_stride=stem_stride,
        deep_stem=deep_stem,
        stem_pool=stem_pool,
        stem_activation=stem_activation,
        stages=tuple(stages),
        head_channels=head_channels,
        hidden_features=hidden,
        head_pool=head_pool,
        head_activation=main_activation,
        classes=classes,
        macs_budget=macs_budget,
    )


def _draw_stage(
    draw: Draw, space: DesignSpace, kind: BlockKind, channels: float, halve: bool, activation: Op
) -> StagePlan:
    pool: Op | None = None
    if kind in (BlockKind.INCEPTION, BlockKind.DENSE) or draw.chance(space.pool_downsample_prob):
        pool = Op.MAXPOOL2D if draw.chance(0.6) else Op.AVGPOOL2D
    kernel = draw.weighted(space.kernels)
    blocks = []
    for _ in range(draw.integer(*space.blocks_per_stage) + (1 if kind is BlockKind.DENSE else 0)):
        # MobileNetV3 and EfficientNet mix kernel sizes inside a stage.
        block_kernel = draw.weighted(space.kernels) if draw.chance(0.25) else kernel
        dilation = 2 if block_kernel == 3 and draw.chance(space.dilation_prob) else 1
        expansion = draw.weighted(space.expansions) if kind is BlockKind.INVERTED else 1.0
        branches: tuple[str, ...] = ()
        if kind is BlockKind.INCEPTION:
            extra = ("3x3", "5x5", "double3x3", "factorized7", "pool")
            branches = ("1x1", *sorted({draw.pick(extra) for _ in range(draw.integer(1, 3))}))
        blocks.append(BlockPlan(block_kernel, dilation, expansion, branches))
    squeeze = None
    if kind in (BlockKind.BASIC, BlockKind.BOTTLENECK, BlockKind.INVERTED) and draw.chance(space.se_prob):
        squeeze = SqueezePlan(
            reduction=draw.pick(space.se_reductions),
            activation=draw.pick((Op.RELU, Op.SILU, activation)),
            gate=draw.pick((Op.SIGMOID, Op.HARDSIGMOID)),
        )
    groups, group_width = 1, 0
    if kind in (BlockKind.PLAIN, BlockKind.BASIC, BlockKind.BOTTLENECK) and draw.chance(space.grouped_prob):
        if draw.chance(space.group_width_prob):
            group_width = draw.pick(space.group_widths)
        else:
            groups = draw.pick(space.group_counts)
    return StagePlan(
        kind=kind,
        channels=channels,
        odd_channels=draw.chance(space.odd_channels_prob),
        halve=halve,
        pool=pool,
        activation=activation,
        blocks=tuple(blocks),
        squeeze=squeeze,
        groups=groups,
        group_width=group_width,
        separable=kind is BlockKind.PLAIN and draw.chance(space.separable_prob),
        batchnorm=not (kind is BlockKind.PLAIN and draw.chance(space.no_batchnorm_prob)),
        growth=draw.pick(space.dense_growth) if kind is BlockKind.DENSE else 0,
    )
