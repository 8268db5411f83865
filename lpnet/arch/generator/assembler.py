"""The network assembler: realises a plan at a width and resolution scale (stem, stages, head), and
rescales it until its cost fits the design space's bounds."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import ValidationError

from lpnet.arch.counting import network_cost
from lpnet.arch.generator.blocks import Blocks
from lpnet.arch.generator.graph_builder import GraphBuilder, Tensor
from lpnet.arch.generator.plan import Plan, StagePlan
from lpnet.arch.generator.space import BlockKind, DesignSpace
from lpnet.arch.ir import NETWORK_INPUT, Network, Op
from lpnet.errors import GenerationError

# Feature maps smaller than this on their short side are not downsampled further.
_MIN_SIDE_TO_HALVE = 4


@dataclass(frozen=True)
class Scale:
    """Width (for transformers, heads) and resolution multipliers and a depth cap applied to a plan
    when it is realised."""

    width: float = 1.0
    resolution: float = 1.0
    max_blocks: int | None = None


class _Realiser:
    """A plan realised as one network at one scale."""

    def __init__(self, plan: Plan, scale: Scale, space: DesignSpace) -> None:
        self.plan = plan
        self.scale = scale
        self.space = space
        self.g = GraphBuilder()
        self.blocks = Blocks(self.g, scale.width, space)

    def input_hw(self) -> tuple[int, int]:
        low, high = self.space.resolution
        return (
            max(low, min(high, round(self.plan.height * self.scale.resolution))),
            max(low, min(high, round(self.plan.width * self.scale.resolution))),
        )

    def network(self, name: str, family: str) -> Network:
        height, width = self.input_hw()
        x = self.stem(Tensor(NETWORK_INPUT, 3, (height, width)))
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

    def stem(self, x: Tensor) -> Tensor:
        plan, g = self.plan, self.g
        channels = self.blocks.scaled(plan.stem_channels)
        act = plan.stem_activation
        if plan.deep_stem:
            half = self.blocks.scaled(plan.stem_channels / 2)
            x = g.conv_bn_act("stem", x, half, act, 3, plan.stem_stride)
            x = g.conv_bn_act("stem", x, half, act, 3)
            x = g.conv_bn_act("stem", x, channels, act, 3)
        else:
            x = g.conv_bn_act("stem", x, channels, act, plan.stem_kernel, plan.stem_stride)
        if plan.stem_pool and min(x.hw) >= _MIN_SIDE_TO_HALVE:
            x = g.halving_pool("stem", Op.MAXPOOL2D, x)
        return x

    def stage(self, scope: str, stage: StagePlan, x: Tensor, first: bool) -> Tensor:
        blocks = stage.blocks[: self.scale.max_blocks]
        stride = 2 if stage.halve and min(x.hw) >= _MIN_SIDE_TO_HALVE else 1
        channels = self.blocks.scaled(stage.channels, stage.odd_channels)
        if stage.kind is BlockKind.DENSE:
            return self.blocks.dense_stage(scope, stage, blocks, x, stride, first)
        if stride == 2 and stage.pool is not None:
            x = self.g.halving_pool(scope, stage.pool, x)
            stride = 1
        if stage.kind is BlockKind.INCEPTION:
            for index, block in enumerate(blocks):
                x = self.blocks.inception(f"{scope}.{stage.kind.value}{index}", stage, block, x, channels)
            return x
        build = {
            BlockKind.PLAIN: self.blocks.plain,
            BlockKind.BASIC: self.blocks.basic,
            BlockKind.BOTTLENECK: self.blocks.bottleneck,
            BlockKind.INVERTED: self.blocks.inverted,
        }[stage.kind]
        for index, block in enumerate(blocks):
            x = build(
                f"{scope}.{stage.kind.value}{index}", stage, block, x, channels, stride if index == 0 else 1
            )
        return x

    def head(self, x: Tensor) -> Tensor:
        plan, g = self.plan, self.g
        if plan.head_channels is not None:
            x = g.conv_bn_act("head", x, self.blocks.scaled(plan.head_channels), plan.head_activation)
        x = g.flatten("head", g.global_pool("head", x, plan.head_pool))
        # The hidden linears are cut to the weight bound of the first (a flattened map's is the widest).
        fitting = max(8, int(self.space.max_head_params / x.channels) // 8 * 8)
        for features in plan.hidden_features:
            x = g.unary("head", plan.head_activation, g.linear("head", x, min(features, fitting)))
        return g.linear("head", x, plan.classes)


def feature_elements(network: Network) -> int:
    """Elements summed over every layer's output."""
    batch = network.input_shape[0]
    return sum(batch * layer.out_channels * layer.out_hw[0] * layer.out_hw[1] for layer in network.layers)


def fit_cost(plan: Plan, space: DesignSpace, name: str, family: str) -> Network:
    """Realise the plan, rescaling width and resolution (then depth) until its cost fits the bounds.

    The bounds are [min_macs, the plan's MAC budget] and `max_feature_elements`. MACs grow about
    quadratically in both width and resolution and feature elements about linearly in width and
    quadratically in resolution, so each rebuild moves both by the root of the remaining ratio that
    brings the furthest-off quantity a tenth inside its bound. When a rebuild changes nothing (width
    and resolution are clamped) and the network is still too large, every stage drops a block.
    """
    scale = Scale()
    macs, elements = 0, 0
    previous: tuple[int, int] | None = None
    for _ in range(space.guard_attempts):
        try:
            network = _Realiser(plan, scale, space).network(name, family)
        except ValidationError as exc:  # more weights than any network may have: narrower
            if not any(error["type"] == "architecture_too_large" for error in exc.errors()):
                raise
            scale, previous = replace(scale, width=scale.width * 0.7), None
            continue
        macs, elements = network_cost(network).macs, feature_elements(network)
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
