"""The blocks of a stage, realised at one width: plain stacks, residual and bottleneck blocks,
inverted residuals, squeeze-excitation, Inception-style branches and DenseNet-style stages."""

from __future__ import annotations

import math

from lpnet.arch.generator.graph_builder import GraphBuilder, Tensor
from lpnet.arch.generator.plan import BlockPlan, StagePlan
from lpnet.arch.generator.space import DesignSpace
from lpnet.arch.ir import Op


class Blocks:
    """Appends the blocks of planned stages to a graph, their channel counts scaled by `width` and
    kept inside the space's range."""

    def __init__(self, g: GraphBuilder, width: float, space: DesignSpace) -> None:
        self.g = g
        self.width = width
        self.space = space

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

    @staticmethod
    def groups(stage: StagePlan, *channels: int) -> int:
        """The group count of a spatial conv of `stage` between `channels`: its drawn count where
        the channels allow it, or as many groups of its drawn width as they allow."""
        common = math.gcd(*channels)
        if stage.group_width:
            width = math.gcd(common, stage.group_width)
            return common // width if width >= 8 else 1  # odd channels: no groups of 8 or more
        return math.gcd(stage.groups, common)

    def scaled(self, base: float, odd: bool = False) -> int:
        """A planned channel count at `width`."""
        return self.rounded(base * self.width, odd)

    def plain(
        self, scope: str, stage: StagePlan, block: BlockPlan, x: Tensor, channels: int, stride: int
    ) -> Tensor:
        g, act = self.g, stage.activation
        dilation = block.dilation if stride == 1 else 1
        if stage.separable:
            x = g.conv_bn_act(
                scope, x, x.channels, act, block.kernel, stride, x.channels, dilation, stage.batchnorm
            )
            return g.conv_bn_act(scope, x, channels, act, batchnorm=stage.batchnorm)
        groups = self.groups(stage, x.channels, channels)
        return g.conv_bn_act(scope, x, channels, act, block.kernel, stride, groups, dilation, stage.batchnorm)

    def basic(
        self, scope: str, stage: StagePlan, block: BlockPlan, x: Tensor, channels: int, stride: int
    ) -> Tensor:
        g, act = self.g, stage.activation
        y = g.conv_bn_act(
            scope, x, channels, act, block.kernel, stride, self.groups(stage, x.channels, channels)
        )
        dilation = block.dilation if stride == 1 else 1
        y = g.conv_bn_act(scope, y, channels, None, block.kernel, 1, self.groups(stage, channels), dilation)
        return self.residual(scope, stage, x, y, stride)

    def bottleneck(
        self, scope: str, stage: StagePlan, block: BlockPlan, x: Tensor, channels: int, stride: int
    ) -> Tensor:
        g, act = self.g, stage.activation
        if stage.groups > 1 or stage.group_width:
            # ResNeXt's middle width is groups x width-per-group, twice a ResNet's.
            mid = self.grouped(self.width * stage.channels / 2, stage.group_width or stage.groups)
        else:
            mid = self.scaled(stage.channels / 4, stage.odd_channels)
        dilation = block.dilation if stride == 1 else 1
        y = g.conv_bn_act(scope, x, mid, act)
        y = g.conv_bn_act(scope, y, mid, act, block.kernel, stride, self.groups(stage, mid), dilation)
        y = g.conv_bn_act(scope, y, channels, None)
        return self.residual(scope, stage, x, y, stride)

    def residual(self, scope: str, stage: StagePlan, x: Tensor, y: Tensor, stride: int) -> Tensor:
        """Squeeze-excitation on the branch, a shortcut (projected when shapes differ), add, activation."""
        g = self.g
        y = self.squeeze_excite(scope, stage, y)
        shortcut = x
        if stride != 1 or x.channels != y.channels:
            shortcut = g.conv_bn_act(f"{scope}.shortcut", x, y.channels, None, 1, stride)
        return g.unary(scope, stage.activation, g.merge(scope, Op.ADD, [shortcut, y]))

    def inverted(
        self, scope: str, stage: StagePlan, block: BlockPlan, x: Tensor, channels: int, stride: int
    ) -> Tensor:
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

    def squeeze_excite(self, scope: str, stage: StagePlan, x: Tensor) -> Tensor:
        if stage.squeeze is None:
            return x
        g, plan = self.g, stage.squeeze
        squeezed = max(self.space.channels[0], 8 * round(x.channels / plan.reduction / 8))
        s = g.global_pool(f"{scope}.se", x)
        s = g.conv_bn_act(f"{scope}.se", s, squeezed, plan.activation, batchnorm=False)
        s = g.conv_bn_act(f"{scope}.se", s, x.channels, plan.gate, batchnorm=False)
        return g.merge(f"{scope}.se", Op.MUL, [x, s])

    def inception(self, scope: str, stage: StagePlan, block: BlockPlan, x: Tensor, channels: int) -> Tensor:
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
        stage: StagePlan,
        blocks: tuple[BlockPlan, ...],
        x: Tensor,
        stride: int,
        first: bool,
    ) -> Tensor:
        """A transition (bn, act, 1x1 conv halving the channels, 2x2 average pool) and a dense block."""
        g, act = self.g, stage.activation
        if not first:
            x = g.unary(f"{scope}.transition", Op.BATCHNORM2D, x)
            x = g.unary(f"{scope}.transition", act, x)
            x = g.conv(f"{scope}.transition", x, self.rounded(x.channels / 2))
        if stride == 2:
            x = g.halving_pool(f"{scope}.transition", stage.pool or Op.AVGPOOL2D, x)
        low, high = self.space.channels
        growth = max(low, round(stage.growth * self.width))
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
