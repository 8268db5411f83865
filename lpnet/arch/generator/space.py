"""The design space generated networks are drawn from: block kinds, distributions and cost bounds."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from lpnet.arch.ir import Op

T = TypeVar("T")
# Options and their relative weights.
Weighted = tuple[tuple[T, float], ...]


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
        grouped_prob: chance that a plain, basic or bottleneck stage uses grouped convs.
        group_width_prob: chance that a grouped stage draws its channels per group (RegNet: many
            narrow groups, as many as the channels allow) rather than its group count (ResNeXt).
        group_counts: candidate group counts, uniform; the count is the largest common divisor of
            the drawn count and the channels.
        group_widths: candidate channels per group, uniform; a conv whose channels the drawn width
            does not divide takes the largest common divisor of the two as its width.
        separable_prob: chance that a plain stage uses depthwise-separable convs.
        no_batchnorm_prob: chance that a plain stage has biased convs and no batch norm (VGG).
        dilation_prob: chance that a stride-1 3x3 conv of a stage is dilated by 2.
        expansions: weights of the inverted-residual expansion ratios.
        dense_growth: candidate growth rates of DENSE stages before width scaling, uniform.
        head_conv_prob: chance of a 1x1 conv to a wide feature before pooling (MobileNet's 1280).
        hidden_linear_prob: chance of a hidden linear layer and activation in the classifier.
        flatten_head_prob: chance that the classifier reads the last map average-pooled to a few
            positions a side and flattened, through one or two wide hidden linears, rather than its
            global mean (AlexNet, VGG).
        flatten_sides: candidate sides of that pooled map, uniform (cut to the map's own side).
        flatten_hidden: inclusive range of those hidden linears' features, in multiples of 8.
        max_head_params: most weights of a flattened head's first linear: its hidden features are cut
            until it fits (VGG-16's first classifier layer has 103 M).
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
    group_width_prob: float = 0.5
    group_counts: tuple[int, ...] = (2, 4, 8, 16, 32)
    group_widths: tuple[int, ...] = (8, 16, 24, 32, 48, 64)
    separable_prob: float = 0.2
    no_batchnorm_prob: float = 0.15
    dilation_prob: float = 0.08
    expansions: Weighted[float] = ((1.0, 0.12), (2.0, 0.1), (3.0, 0.2), (4.0, 0.18), (4.5, 0.1), (6.0, 0.3))
    dense_growth: tuple[int, ...] = (12, 16, 24, 32)
    head_conv_prob: float = 0.3
    hidden_linear_prob: float = 0.15
    flatten_head_prob: float = 0.12
    flatten_sides: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
    flatten_hidden: tuple[int, int] = (64, 512)
    max_head_params: float = 1.2e8
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
