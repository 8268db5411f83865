"""Seeded generator of CNN architectures that spans the design space people build from.

`generate_network(seed)` turns one integer into one network: a stem, 2-5 stages of plain, basic
residual, bottleneck, inverted-residual, Inception-style or DenseNet-style blocks (with optional
squeeze-and-excitation), and a pooled classifier, its MACs held inside the design space's bounds.
The same seed gives the same network on every run and Python version: the generator draws only
`random.Random.random()`, whose sequence Python keeps stable.

Seeds come in two ranges that never overlap:

- `PROFILING_SEEDS` give networks of family "generated", which devices are profiled on, so a
  predictor learns from layers across the design space rather than from width variants of a few
  families;
- `EVALUATION_SEEDS` give networks of family "generated-eval", which are never profiled: a
  predictor is judged on them as on architectures it has not seen.

Both ranges draw from the same distribution, so an evaluation network is new to the predictor yet
comes from the space its profiling material covers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, TypeVar

from lpnet.arch.counting import network_cost
from lpnet.arch.ir import NETWORK_INPUT, Layer, Network, Op, conv_output_hw
from lpnet.errors import GenerationError

T = TypeVar("T")
Weighted = tuple[tuple[T, float], ...]

PROFILING_SEEDS = range(0, 10**6)
EVALUATION_SEEDS = range(10**9, 10**9 + 10**6)
PROFILING_FAMILY = "generated"
EVALUATION_FAMILY = "generated-eval"

# Feature maps smaller than this on their short side are not downsampled further.
_MIN_SIDE_TO_HALVE = 4


class BlockKind(StrEnum):
    """The kinds of stage the generator builds."""

    PLAIN = "plain"  # conv-bn-act stacks (VGG; depthwise-separable as in MobileNetV1)
    BASIC = "basic"  # two kxk convs and a shortcut (ResNet-18/34)
    BOTTLENECK = "bottleneck"  # 1x1, kxk, 1x1 with expansion 4 and a shortcut (ResNet-50, ResNeXt)
    INVERTED = "inverted"  # 1x1 expand, depthwise kxk, 1x1 project (MobileNetV2/V3, EfficientNet)
    INCEPTION = "inception"  # parallel branches concatenated (GoogLeNet, Inception-v3)
    DENSE = "dense"  # each layer concatenates all earlier feature maps (DenseNet-BC)


@dataclass(frozen=True)
class DesignSpace:
    """The distributions a generated network is drawn from, and the cost bounds it must meet.

    Attributes:
        resolution: inclusive range of the input side in pixels, drawn uniformly in steps of 8.
        non_square_prob: chance that the input width is the height times 0.75, 1.25 or 1.5.
        odd_resolution_prob: chance that each input side is moved by one pixel off the multiple of 8.
        stages: inclusive range of the number of stages, uniform.
        channels: inclusive range every channel count is clamped to.
        odd_channels_prob: chance that a stage keeps an unrounded (odd) channel count instead of a
            multiple of 8.
        stem_channels: inclusive range of the stem's output channels, uniform before rounding.
        first_stage_channels: inclusive range of the first stage's channels, uniform before rounding.
        stage_growth: range of the channel ratio between consecutive stages, uniform.
        primary_kind_prob: chance that a stage uses the network's primary block kind rather than
            a fresh draw from `block_kinds`.
        block_kinds: weights of the block kinds (the network's primary kind and every fresh draw).
        blocks_per_stage: inclusive range of blocks (dense layers for DENSE) per stage, uniform.
        kernels: weights of the spatial kernel sizes of plain, residual and inverted blocks.
        activations: weights of the network's main activation.
        stage_activation_prob: chance that a stage draws its own activation instead (MobileNetV3
            mixes relu and hardswish).
        stem_stride2_prob: chance that the stem conv has stride 2.
        stem_maxpool_prob: chance that a 3x3 stride-2 max pool follows the stem conv. With neither,
            the first stage runs at full input resolution.
        deep_stem_prob: chance of three 3x3 stem convs instead of one larger one (ResNet-C).
        stage_stride2_prob: chance that a stage after the first halves the resolution.
        pool_downsample_prob: chance that a halving stage uses a max or average pool instead of a
            stride-2 conv (always a pool or a transition for INCEPTION and DENSE stages).
        se_prob: chance that a residual, bottleneck or inverted stage carries squeeze-excitation.
        se_reductions: reduction ratios of the squeeze channels, uniform.
        grouped_prob: chance that a plain, basic or bottleneck stage uses grouped convs (ResNeXt);
            the group count is the largest common divisor of the drawn count and the channels.
        group_counts: candidate group counts, uniform.
        separable_prob: chance that a plain stage uses depthwise-separable convs.
        no_batchnorm_prob: chance that a plain stage has biased convs and no batch norm (VGG).
        dilation_prob: chance that a stride-1 3x3 conv of a stage is dilated by 2.
        expansions: weights of the inverted-residual expansion ratios.
        dense_growth: candidate growth rates of DENSE stages before width scaling, uniform.
        head_conv_prob: chance of a 1x1 conv to a wide feature before pooling (MobileNet's 1280).
        hidden_linear_prob: chance of a hidden linear layer and activation in the classifier.
        classes: weights of the classifier's output size.
        min_macs: fewest multiply-accumulates a network may have (lpnet.arch.counting).
        max_macs: most multiply-accumulates a network may have.
        budget_floor_macs: each network draws a MAC budget log-uniformly from
            [budget_floor_macs, max_macs] and is scaled down to it when larger, so the cost guard
            spreads large samples over that range instead of piling them up at `max_macs`.
        max_feature_elements: most elements summed over every layer's output, a bound on the
            memory traffic that batch norms and activations at high resolution cost beyond MACs.
        guard_attempts: most rebuilds at a scaled width, resolution or depth to fit these bounds.
    """

    resolution: tuple[int, int] = (96, 320)
    non_square_prob: float = 0.12
    odd_resolution_prob: float = 0.08
    stages: tuple[int, int] = (2, 5)
    channels: tuple[int, int] = (8, 2048)
    odd_channels_prob: float = 0.08
    stem_channels: tuple[int, int] = (8, 64)
    first_stage_channels: tuple[int, int] = (16, 128)
    stage_growth: tuple[float, float] = (1.25, 2.5)
    primary_kind_prob: float = 0.6
    block_kinds: Weighted[BlockKind] = (
        (BlockKind.PLAIN, 0.16),
        (BlockKind.BASIC, 0.18),
        (BlockKind.BOTTLENECK, 0.18),
        (BlockKind.INVERTED, 0.22),
        (BlockKind.INCEPTION, 0.13),
        (BlockKind.DENSE, 0.13),
    )
    blocks_per_stage: tuple[int, int] = (1, 4)
    kernels: Weighted[int] = ((1, 0.06), (3, 0.6), (5, 0.24), (7, 0.1))
    activations: Weighted[Op] = (
        (Op.RELU, 0.34),
        (Op.RELU6, 0.14),
        (Op.SILU, 0.14),
        (Op.GELU, 0.1),
        (Op.HARDSWISH, 0.12),
        (Op.SIGMOID, 0.05),
        (Op.TANH, 0.05),
        (Op.HARDSIGMOID, 0.06),
    )
    stage_activation_prob: float = 0.25
    stem_stride2_prob: float = 0.75
    stem_maxpool_prob: float = 0.4
    deep_stem_prob: float = 0.15
    stage_stride2_prob: float = 0.85
    pool_downsample_prob: float = 0.2
    se_prob: float = 0.3
    se_reductions: tuple[int, ...] = (4, 8, 16)
    grouped_prob: float = 0.25
    group_counts: tuple[int, ...] = (2, 4, 8, 16, 32)
    separable_prob: float = 0.2
    no_batchnorm_prob: float = 0.15
    dilation_prob: float = 0.08
    expansions: Weighted[float] = ((1.0, 0.12), (2.0, 0.1), (3.0, 0.2), (4.0, 0.18), (4.5, 0.1), (6.0, 0.3))
    dense_growth: tuple[int, ...] = (12, 16, 24, 32)
    head_conv_prob: float = 0.3
    hidden_linear_prob: float = 0.15
    classes: Weighted[int] = ((10, 0.2), (100, 0.2), (1000, 0.6))
    min_macs: float = 2e7
    max_macs: float = 2.5e9
    budget_floor_macs: float = 1.5e8
    max_feature_elements: float = 4e7
    guard_attempts: int = 40

    def __post_init__(self) -> None:
        for name in ("resolution", "stages", "channels", "stem_channels", "first_stage_channels"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"DesignSpace.{name} must be an increasing range of positive values")
        if not 0 < self.min_macs < self.budget_floor_macs <= self.max_macs:
            raise ValueError("DesignSpace needs 0 < min_macs < budget_floor_macs <= max_macs")
        if self.max_feature_elements <= 0:
            raise ValueError("DesignSpace.max_feature_elements must be positive")
        if self.guard_attempts < 1:
            raise ValueError("DesignSpace.guard_attempts must be at least 1")


DEFAULT_SPACE = DesignSpace()


# ---- random draws ---------------------------------------------------------------------------------


class _Draw:
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


# ---- the plan: every random choice, before widths and resolution are fixed --------------------------


@dataclass(frozen=True)
class _SqueezePlan:
    reduction: int
    activation: Op
    gate: Op  # sigmoid or hardsigmoid


@dataclass(frozen=True)
class _BlockPlan:
    kernel: int
    dilation: int = 1
    expansion: float = 1.0  # inverted: hidden = in * expansion
    branches: tuple[str, ...] = ()  # inception branch kinds


@dataclass(frozen=True)
class _StagePlan:
    kind: BlockKind
    channels: float  # before width scaling
    odd_channels: bool
    halve: bool
    pool: Op | None  # the pool that halves the resolution, or None for a stride-2 conv
    activation: Op
    blocks: tuple[_BlockPlan, ...]
    squeeze: _SqueezePlan | None = None
    groups: int = 1  # drawn group count of the spatial convs (1: dense)
    separable: bool = False
    batchnorm: bool = True
    growth: int = 0  # dense growth rate before width scaling


@dataclass(frozen=True)
class _Plan:
    height: int
    width: int
    stem_channels: float
    stem_kernel: int
    stem_stride: int
    deep_stem: bool
    stem_pool: bool
    stem_activation: Op
    stages: tuple[_StagePlan, ...]
    head_channels: float | None
    hidden_features: int | None
    head_activation: Op
    classes: int
    macs_budget: float


def _draw_plan(draw: _Draw, space: DesignSpace) -> _Plan:
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
    return _Plan(
        height=height,
        width=width,
        stem_channels=stem_channels,
        stem_kernel=stem_kernel,
        stem_stride=stem_stride,
        deep_stem=deep_stem,
        stem_pool=stem_pool,
        stem_activation=draw.weighted(space.activations) if draw.chance(0.2) else main_activation,
        stages=tuple(stages),
        head_channels=head_channels,
        hidden_features=hidden_features,
        head_activation=main_activation,
        classes=draw.weighted(space.classes),
        macs_budget=math.exp(draw.uniform(math.log(space.budget_floor_macs), math.log(space.max_macs))),
    )


def _draw_stage(
    draw: _Draw, space: DesignSpace, kind: BlockKind, channels: float, halve: bool, activation: Op
) -> _StagePlan:
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
        blocks.append(_BlockPlan(block_kernel, dilation, expansion, branches))
    squeeze = None
    if kind in (BlockKind.BASIC, BlockKind.BOTTLENECK, BlockKind.INVERTED) and draw.chance(space.se_prob):
        squeeze = _SqueezePlan(
            reduction=draw.pick(space.se_reductions),
            activation=draw.pick((Op.RELU, Op.SILU, activation)),
            gate=draw.pick((Op.SIGMOID, Op.HARDSIGMOID)),
        )
    groups = 1
    if kind in (BlockKind.PLAIN, BlockKind.BASIC, BlockKind.BOTTLENECK) and draw.chance(space.grouped_prob):
        groups = draw.pick(space.group_counts)
    return _StagePlan(
        kind=kind,
        channels=channels,
        odd_channels=draw.chance(space.odd_channels_prob),
        halve=halve,
        pool=pool,
        activation=activation,
        blocks=tuple(blocks),
        squeeze=squeeze,
        groups=groups,
        separable=kind is BlockKind.PLAIN and draw.chance(space.separable_prob),
        batchnorm=not (kind is BlockKind.PLAIN and draw.chance(space.no_batchnorm_prob)),
        growth=draw.pick(space.dense_growth) if kind is BlockKind.DENSE else 0,
    )


# ---- realising a plan as IR layers ------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str
    channels: int
    hw: tuple[int, int]


class _GraphBuilder:
    """Appends IR layers with consistent shapes; each call returns the tensor the new layer produces."""

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self._names: set[str] = set()

    def add(
        self,
        scope: str,
        op: Op,
        inputs: Sequence[_Tensor],
        out_channels: int,
        out_hw: tuple[int, int] | None = None,
        **fields: Any,
    ) -> _Tensor:
        """Append a layer named `<scope>.<op>` (with a suffix when taken) reading `inputs`."""
        base = f"{scope}.{op.value}"
        name, index = base, 1
        while name in self._names:
            name, index = f"{base}_{index}", index + 1
        self._names.add(name)
        first = inputs[0]
        layer = Layer(
            name=name,
            op=op,
            inputs=[t.name for t in inputs],
            in_channels=sum(t.channels for t in inputs) if op is Op.CONCAT else first.channels,
            out_channels=out_channels,
            in_hw=first.hw,
            out_hw=out_hw or first.hw,
            **fields,
        )
        self.layers.append(layer)
        return _Tensor(name, out_channels, layer.out_hw)

    def conv(
        self,
        scope: str,
        x: _Tensor,
        out_channels: int,
        kernel: int | tuple[int, int] = 1,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = False,
    ) -> _Tensor:
        """A 'same'-padded conv; kernels larger than the feature map shrink to fit, dilation needs 8 px."""
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        kh, kw = _fit_kernel(kh, x.hw[0]), _fit_kernel(kw, x.hw[1])
        if min(x.hw) < 8:
            dilation = 1
        padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
        out_hw = conv_output_hw(x.hw, (kh, kw), (stride, stride), padding, (dilation, dilation))
        return self.add(
            scope,
            Op.CONV2D,
            [x],
            out_channels,
            out_hw=out_hw,
            kernel=(kh, kw),
            stride=(stride, stride),
            padding=padding,
            dilation=(dilation, dilation),
            groups=groups,
            bias=bias,
        )

    def unary(self, scope: str, op: Op, x: _Tensor) -> _Tensor:
        return self.add(scope, op, [x], x.channels)

    def conv_bn_act(
        self,
        scope: str,
        x: _Tensor,
        out_channels: int,
        activation: Op | None,
        kernel: int | tuple[int, int] = 1,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        batchnorm: bool = True,
    ) -> _Tensor:
        y = self.conv(scope, x, out_channels, kernel, stride, groups, dilation, bias=not batchnorm)
        if batchnorm:
            y = self.unary(scope, Op.BATCHNORM2D, y)
        return self.unary(scope, activation, y) if activation is not None else y

    def pool(
        self,
        scope: str,
        op: Op,
        x: _Tensor,
        kernel: int,
        stride: int,
        padding: int = 0,
        ceil_mode: bool = False,
    ) -> _Tensor:
        out_hw = conv_output_hw(
            x.hw, (kernel, kernel), (stride, stride), (padding, padding), ceil_mode=ceil_mode
        )
        return self.add(
            scope,
            op,
            [x],
            x.channels,
            out_hw=out_hw,
            kernel=(kernel, kernel),
            stride=(stride, stride),
            padding=(padding, padding),
            ceil_mode=ceil_mode,
        )

    def halving_pool(self, scope: str, op: Op, x: _Tensor) -> _Tensor:
        """A stride-2 pool: 3x3 padded for max pooling (ResNet's stem), 2x2 for average (DenseNet)."""
        if op is Op.MAXPOOL2D:
            return self.pool(scope, op, x, 3, 2, padding=1)
        return self.pool(scope, op, x, 2, 2, ceil_mode=True)

    def merge(self, scope: str, op: Op, inputs: Sequence[_Tensor]) -> _Tensor:
        out = sum(t.channels for t in inputs) if op is Op.CONCAT else inputs[0].channels
        return self.add(scope, op, inputs, out)

    def global_pool(self, scope: str, x: _Tensor) -> _Tensor:
        return self.add(scope, Op.ADAPTIVE_AVGPOOL2D, [x], x.channels, out_hw=(1, 1))

    def flatten(self, scope: str, x: _Tensor) -> _Tensor:
        return self.add(scope, Op.FLATTEN, [x], x.channels * x.hw[0] * x.hw[1], out_hw=(1, 1))

    def linear(self, scope: str, x: _Tensor, out_features: int) -> _Tensor:
        return self.add(scope, Op.LINEAR, [x], out_features, bias=True)


def _fit_kernel(kernel: int, side: int) -> int:
    """The kernel, cut to the largest odd size within the feature map (3 at least)."""
    return min(kernel, max(3, side if side % 2 else side - 1))


@dataclass(frozen=True)
class _Scale:
    """Width and resolution multipliers and a depth cap applied to a plan when it is realised."""

    width: float = 1.0
    resolution: float = 1.0
    max_blocks: int | None = None


class _Realiser:
    def __init__(self, plan: _Plan, scale: _Scale, space: DesignSpace) -> None:
        self.plan = plan
        self.scale = scale
        self.space = space
        self.g = _GraphBuilder()

    def rounded(self, count: float, odd: bool = False) -> int:
        """A channel count inside the space's range: a multiple of 8, or odd when `odd`."""
        low, high = self.space.channels
        if not odd:
            return max(low, min(high, 8 * round(count / 8)))
        value = max(low, min(high, round(count)))
        if value % 2 == 0:
            value = value + 1 if value < high else value - 1
        return value

    def grouped(self, count: float, groups: int) -> int:
        """A channel count inside the space's range that is a multiple of both 8 and `groups`."""
        low, high = self.space.channels
        unit = math.lcm(8, groups)
        return max(unit * -(-low // unit), min(unit * (high // unit), unit * round(count / unit)))

    def scaled(self, base: float, odd: bool = False) -> int:
        """A planned channel count at this realisation's width."""
        return self.rounded(base * self.scale.width, odd)

    def input_hw(self) -> tuple[int, int]:
        low, high = self.space.resolution
        return (
            max(low, min(high, round(self.plan.height * self.scale.resolution))),
            max(low, min(high, round(self.plan.width * self.scale.resolution))),
        )

    def network(self, name: str, family: str) -> Network:
        height, width = self.input_hw()
        x = self.stem(_Tensor(NETWORK_INPUT, 3, (height, width)))
        for index, stage in enumerate(self.plan.stages):
            x = self.stage(f"stage{index}", stage, x, first=index == 0)
        out = self.head(x)
        return Network(
            name=name,
            family=family,
            input_shape=(1, 3, height, width),
            layers=self.g.layers,
            outputs=[out.name],
        )

    def stem(self, x: _Tensor) -> _Tensor:
        plan, g = self.plan, self.g
        channels = self.scaled(plan.stem_channels)
        act = plan.stem_activation
        if plan.deep_stem:
            half = self.scaled(plan.stem_channels / 2)
            x = g.conv_bn_act("stem", x, half, act, 3, plan.stem_stride)
            x = g.conv_bn_act("stem", x, half, act, 3)
            x = g.conv_bn_act("stem", x, channels, act, 3)
        else:
            x = g.conv_bn_act("stem", x, channels, act, plan.stem_kernel, plan.stem_stride)
        if plan.stem_pool and min(x.hw) >= _MIN_SIDE_TO_HALVE:
            x = g.halving_pool("stem", Op.MAXPOOL2D, x)
        return x

    def stage(self, scope: str, stage: _StagePlan, x: _Tensor, first: bool) -> _Tensor:
        blocks = stage.blocks[: self.scale.max_blocks]
        stride = 2 if stage.halve and min(x.hw) >= _MIN_SIDE_TO_HALVE else 1
        channels = self.scaled(stage.channels, stage.odd_channels)
        if stage.kind is BlockKind.DENSE:
            return self.dense_stage(scope, stage, blocks, x, stride, first)
        if stride == 2 and stage.pool is not None:
            x = self.g.halving_pool(scope, stage.pool, x)
            stride = 1
        if stage.kind is BlockKind.INCEPTION:
            for index, block in enumerate(blocks):
                x = self.inception(f"{scope}.{stage.kind.value}{index}", stage, block, x, channels)
            return x
        build = {
            BlockKind.PLAIN: self.plain,
            BlockKind.BASIC: self.basic,
            BlockKind.BOTTLENECK: self.bottleneck,
            BlockKind.INVERTED: self.inverted,
        }[stage.kind]
        for index, block in enumerate(blocks):
            x = build(
                f"{scope}.{stage.kind.value}{index}", stage, block, x, channels, stride if index == 0 else 1
            )
        return x

    # ---- blocks -------------------------------------------------------------------------------------

    def plain(
        self, scope: str, stage: _StagePlan, block: _BlockPlan, x: _Tensor, channels: int, stride: int
    ) -> _Tensor:
        g, act = self.g, stage.activation
        dilation = block.dilation if stride == 1 else 1
        if stage.separable:
            x = g.conv_bn_act(
                scope, x, x.channels, act, block.kernel, stride, x.channels, dilation, stage.batchnorm
            )
            return g.conv_bn_act(scope, x, channels, act, batchnorm=stage.batchnorm)
        groups = math.gcd(stage.groups, x.channels, channels)
        return g.conv_bn_act(scope, x, channels, act, block.kernel, stride, groups, dilation, stage.batchnorm)

    def basic(
        self, scope: str, stage: _StagePlan, block: _BlockPlan, x: _Tensor, channels: int, stride: int
    ) -> _Tensor:
        g, act = self.g, stage.activation
        y = g.conv_bn_act(
            scope, x, channels, act, block.kernel, stride, math.gcd(stage.groups, x.channels, channels)
        )
        dilation = block.dilation if stride == 1 else 1
        y = g.conv_bn_act(
            scope, y, channels, None, block.kernel, 1, math.gcd(stage.groups, channels), dilation
        )
        return self.residual(scope, stage, x, y, stride)

    def bottleneck(
        self, scope: str, stage: _StagePlan, block: _BlockPlan, x: _Tensor, channels: int, stride: int
    ) -> _Tensor:
        g, act = self.g, stage.activation
        if stage.groups > 1:
            # ResNeXt's middle width is groups x width-per-group, twice a ResNet's.
            mid = self.grouped(self.scale.width * stage.channels / 2, stage.groups)
        else:
            mid = self.scaled(stage.channels / 4, stage.odd_channels)
        dilation = block.dilation if stride == 1 else 1
        y = g.conv_bn_act(scope, x, mid, act)
        y = g.conv_bn_act(scope, y, mid, act, block.kernel, stride, math.gcd(stage.groups, mid), dilation)
        y = g.conv_bn_act(scope, y, channels, None)
        return self.residual(scope, stage, x, y, stride)

    def residual(self, scope: str, stage: _StagePlan, x: _Tensor, y: _Tensor, stride: int) -> _Tensor:
        """Squeeze-excitation on the branch, a shortcut (projected when shapes differ), add, activation."""
        g = self.g
        y = self.squeeze_excite(scope, stage, y)
        shortcut = x
        if stride != 1 or x.channels != y.channels:
            shortcut = g.conv_bn_act(f"{scope}.shortcut", x, y.channels, None, 1, stride)
        return g.unary(scope, stage.activation, g.merge(scope, Op.ADD, [shortcut, y]))

    def inverted(
        self, scope: str, stage: _StagePlan, block: _BlockPlan, x: _Tensor, channels: int, stride: int
    ) -> _Tensor:
        g, act = self.g, stage.activation
        y = x
        if block.expansion != 1.0:
            y = g.conv_bn_act(scope, x, self.rounded(x.channels * block.expansion), act)
        dilation = block.dilation if stride == 1 else 1
        y = g.conv_bn_act(scope, y, y.channels, act, block.kernel, stride, y.channels, dilation)
        y = self.squeeze_excite(scope, stage, y)
        y = g.conv_bn_act(scope, y, channels, None)
        if stride == 1 and x.channels == channels:
            y = g.merge(scope, Op.ADD, [x, y])
        return y

    def squeeze_excite(self, scope: str, stage: _StagePlan, x: _Tensor) -> _Tensor:
        if stage.squeeze is None:
            return x
        g, plan = self.g, stage.squeeze
        squeezed = max(self.space.channels[0], 8 * round(x.channels / plan.reduction / 8))
        s = g.global_pool(f"{scope}.se", x)
        s = g.conv_bn_act(f"{scope}.se", s, squeezed, plan.activation, batchnorm=False)
        s = g.conv_bn_act(f"{scope}.se", s, x.channels, plan.gate, batchnorm=False)
        return g.merge(f"{scope}.se", Op.MUL, [x, s])

    def inception(
        self, scope: str, stage: _StagePlan, block: _BlockPlan, x: _Tensor, channels: int
    ) -> _Tensor:
        g, act = self.g, stage.activation
        share = self.rounded(channels / len(block.branches), stage.odd_channels)
        reduce = self.rounded(share / 2)
        outputs = []
        for branch in block.branches:
            where = f"{scope}.{branch}"
            if branch == "1x1":
                y = g.conv_bn_act(where, x, share, act)
            elif branch == "3x3":
                y = g.conv_bn_act(where, x, reduce, act)
                y = g.conv_bn_act(where, y, share, act, 3, dilation=block.dilation)
            elif branch == "5x5":
                y = g.conv_bn_act(where, x, reduce, act)
                y = g.conv_bn_act(where, y, share, act, 5)
            elif branch == "double3x3":
                y = g.conv_bn_act(where, x, reduce, act)
                y = g.conv_bn_act(where, y, share, act, 3)
                y = g.conv_bn_act(where, y, share, act, 3)
            elif branch == "factorized7":
                y = g.conv_bn_act(where, x, reduce, act)
                y = g.conv_bn_act(where, y, reduce, act, (1, 7))
                y = g.conv_bn_act(where, y, share, act, (7, 1))
            else:  # "pool"
                y = g.pool(where, stage.pool or Op.MAXPOOL2D, x, 3, 1, padding=1)
                y = g.conv_bn_act(where, y, share, act)
            outputs.append(y)
        return g.merge(scope, Op.CONCAT, outputs)

    def dense_stage(
        self,
        scope: str,
        stage: _StagePlan,
        blocks: tuple[_BlockPlan, ...],
        x: _Tensor,
        stride: int,
        first: bool,
    ) -> _Tensor:
        """A transition (bn, act, 1x1 conv halving the channels, 2x2 average pool) and a dense block."""
        g, act = self.g, stage.activation
        if not first:
            x = g.unary(f"{scope}.transition", Op.BATCHNORM2D, x)
            x = g.unary(f"{scope}.transition", act, x)
            x = g.conv(f"{scope}.transition", x, self.rounded(x.channels / 2))
        if stride == 2:
            x = g.halving_pool(f"{scope}.transition", stage.pool or Op.AVGPOOL2D, x)
        low, high = self.space.channels
        growth = max(low, round(stage.growth * self.scale.width))
        features = [x]
        total = x.channels
        for index, block in enumerate(blocks):
            if total + growth > high:
                break
            where = f"{scope}.dense{index}"
            y = features[0] if len(features) == 1 else g.merge(where, Op.CONCAT, features)
            y = g.unary(where, act, g.unary(where, Op.BATCHNORM2D, y))
            y = g.conv_bn_act(where, y, min(high, 4 * growth), act)
            y = g.conv(where, y, growth, block.kernel, dilation=block.dilation)
            features.append(y)
            total += growth
        return features[0] if len(features) == 1 else g.merge(f"{scope}.out", Op.CONCAT, features)

    def head(self, x: _Tensor) -> _Tensor:
        plan, g = self.plan, self.g
        if plan.head_channels is not None:
            x = g.conv_bn_act("head", x, self.scaled(plan.head_channels), plan.head_activation)
        x = g.global_pool("head", x)
        x = g.flatten("head", x)
        if plan.hidden_features is not None:
            x = g.unary("head", plan.head_activation, g.linear("head", x, plan.hidden_features))
        return g.linear("head", x, plan.classes)


# ---- the cost guard and the public API -----------------------------------------------------------------


def _feature_elements(network: Network) -> int:
    """Elements summed over every layer's output."""
    batch = network.input_shape[0]
    return sum(batch * layer.out_channels * layer.out_hw[0] * layer.out_hw[1] for layer in network.layers)


def _fit_cost(plan: _Plan, space: DesignSpace, name: str, family: str) -> Network:
    """Realise the plan, rescaling width and resolution (then depth) until its cost fits the bounds.

    The bounds are [min_macs, the plan's MAC budget] and `max_feature_elements`. MACs grow about
    quadratically in both width and resolution and feature elements about linearly in width and
    quadratically in resolution, so each rebuild moves both by the root of the remaining ratio that
    brings the furthest-off quantity a tenth inside its bound. When a rebuild changes nothing (width
    and resolution are clamped) and the network is still too large, every stage drops a block.
    """
    scale = _Scale()
    macs, elements = 0, 0
    previous: tuple[int, int] | None = None
    for _ in range(space.guard_attempts):
        network = _Realiser(plan, scale, space).network(name, family)
        macs, elements = network_cost(network).macs, _feature_elements(network)
        too_many_macs, too_many_elements = macs > plan.macs_budget, elements > space.max_feature_elements
        if macs >= space.min_macs and not (too_many_macs or too_many_elements):
            return network
        if (macs, elements) == previous:
            depth = scale.max_blocks or max(len(stage.blocks) for stage in plan.stages)
            if macs < space.min_macs or depth <= 1:
                break
            scale, previous = replace(scale, max_blocks=depth - 1), None
            continue
        steps = []
        if too_many_macs:
            steps.append((0.9 * plan.macs_budget / macs) ** (1 / 4))
        if too_many_elements:
            steps.append((0.9 * space.max_feature_elements / elements) ** (1 / 3))
        step = min(steps) if steps else (1.25 * space.min_macs / macs) ** (1 / 4)
        scale = replace(scale, width=scale.width * step, resolution=scale.resolution * step)
        previous = (macs, elements)
    raise GenerationError(
        f"network {name!r} still has {macs:.3g} MACs and {elements:.3g} feature elements after "
        f"{space.guard_attempts} rebuilds, outside its bounds (MACs in [{space.min_macs:.3g}, "
        f"{plan.macs_budget:.3g}], elements up to {space.max_feature_elements:.3g}); widen the design space",
        {"name": name, "macs": macs, "feature_elements": elements},
    )


def seed_family(seed: int) -> str:
    """The family of the network a seed generates: profiling or evaluation.

    Raises:
        GenerationError: the seed lies in neither `PROFILING_SEEDS` nor `EVALUATION_SEEDS`.
    """
    if seed in PROFILING_SEEDS:
        return PROFILING_FAMILY
    if seed in EVALUATION_SEEDS:
        return EVALUATION_FAMILY
    raise GenerationError(
        f"seed {seed} lies in neither the profiling seeds {_describe(PROFILING_SEEDS)} nor the "
        f"evaluation seeds {_describe(EVALUATION_SEEDS)}",
        {"seed": seed},
    )


def generate_network(seed: int, space: DesignSpace = DEFAULT_SPACE) -> Network:
    """The network of one seed: named `gen-<seed>`, family by the seed's range, MACs within bounds.

    Raises:
        GenerationError: the seed lies outside both seed ranges, or the network cannot be rescaled
            into the space's MAC bounds.
    """
    family = seed_family(seed)
    plan = _draw_plan(_Draw(seed), space)
    return _fit_cost(plan, space, f"gen-{seed}", family)


def generate_networks(seeds: range, count: int, space: DesignSpace = DEFAULT_SPACE) -> list[Network]:
    """The networks of the first `count` seeds of `seeds`, which must lie inside one seed range.

    Raises:
        GenerationError: `seeds` is not a step-1 range inside one of `PROFILING_SEEDS` and
            `EVALUATION_SEEDS` (so profiling and evaluation networks never mix), or holds fewer
            than `count` seeds.
    """
    if count < 0:
        raise GenerationError(f"count must be non-negative, got {count}", {"count": count})
    inside = any(
        seeds.step == 1 and allowed.start <= seeds.start and seeds.stop <= allowed.stop
        for allowed in (PROFILING_SEEDS, EVALUATION_SEEDS)
    )
    if not inside:
        raise GenerationError(
            f"seeds {_describe(seeds)} must be a step-1 range inside the profiling seeds "
            f"{_describe(PROFILING_SEEDS)} or the evaluation seeds {_describe(EVALUATION_SEEDS)}",
            {"seeds": _describe(seeds)},
        )
    if count > len(seeds):
        raise GenerationError(
            f"asked for {count} networks but seeds {_describe(seeds)} hold only {len(seeds)}",
            {"count": count, "seeds": _describe(seeds)},
        )
    return [generate_network(seed, space) for seed in seeds[:count]]


def _describe(seeds: range) -> str:
    step = f", {seeds.step}" if seeds.step != 1 else ""
    return f"range({seeds.start}, {seeds.stop}{step})"
