"""Seeded transformer-style networks: attention, layer norm and token layers in the contexts vision
transformers put them in, so that a profile times those operators inside real networks.

Each seed draws one of three layouts, as published vision transformers are built:

- `global` (ViT, DeiT): a patchifying conv, the map read as a token sequence, optionally a class
  token, a position embedding, blocks of attention over every token, then the class token or the
  mean over the tokens.
- `windowed` (Swin): a patchifying conv and a layer norm, 2-4 stages of attention within windows
  (every other block's windows shifted by half a window, with a relative position bias), the stages
  joined by patch merging (space-to-depth, a layer norm, a linear to twice the channels).
- `hybrid` (CoAtNet, MaxViT): a conv stem and 1-2 stages of inverted residuals, then attention stages
  at a lower resolution over windows, some of them dilated across the map (MaxViT's grid attention),
  each stage entered through a stride-2 conv.

Every block is pre-norm, `x + attention(norm(x))` then `x + mlp(norm(x))`, the MLP two biased 1x1
convs (linears over the embedding) around GELU or, now and then, another activation. A network's
embedding is a whole number of heads of 16, 32 or 64 channels; it is rescaled in heads, resolution
and depth until its MACs and the elements its layers write fit `TransformerSpace`'s bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from lpnet.arch.counting import attention_scores, network_cost
from lpnet.arch.generator.assembler import Scale, feature_elements
from lpnet.arch.generator.graph_builder import GraphBuilder, Tensor
from lpnet.arch.generator.plan import Draw
from lpnet.arch.generator.space import Weighted
from lpnet.arch.ir import NETWORK_INPUT, Network, Op
from lpnet.errors import GenerationError


class Layout(StrEnum):
    GLOBAL = "global"
    WINDOWED = "windowed"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class TransformerSpace:
    """The distributions transformer-style networks are drawn from, and their cost bounds.

    Attributes:
        resolution: inclusive range of the (square) input side, in steps of 16.
        layouts: weights of the layouts.
        head_channels: channels per attention head, uniform.
        heads: inclusive range of the first attention stage's heads, uniform.
        max_channels: most channels of any embedding.
        mlp_ratios: the MLP's hidden channels over the embedding, uniform.
        activations: weights of the MLP's activation.
        patches: patch sizes of the global layout's patchifying conv, uniform.
        windows: attention window sides of the windowed and hybrid layouts, uniform.
        global_depth: inclusive range of the global layout's blocks.
        stage_depth: inclusive range of the blocks of each windowed or hybrid attention stage.
        class_token_prob: chance that a global network reads its class token rather than the mean.
        grid_prob: chance that a hybrid block's attention is dilated across the map.
        min_macs, max_macs: the bounds of a network's multiply-accumulates.
        max_elements: most elements summed over the layers' outputs and attention scores.
        guard_attempts: most rebuilds at a smaller scale to fit the bounds.
    """

    resolution: tuple[int, int] = (96, 256)
    layouts: Weighted[Layout] = ((Layout.GLOBAL, 0.3), (Layout.WINDOWED, 0.4), (Layout.HYBRID, 0.3))
    head_channels: tuple[int, ...] = (16, 32, 64)
    heads: tuple[int, int] = (1, 8)
    max_channels: int = 768
    mlp_ratios: tuple[float, ...] = (2.0, 3.0, 4.0)
    activations: Weighted[Op] = ((Op.GELU, 0.8), (Op.SILU, 0.1), (Op.RELU, 0.05), (Op.HARDSWISH, 0.05))
    patches: tuple[int, ...] = (8, 14, 16, 32)
    windows: tuple[int, ...] = (4, 7, 8)
    global_depth: tuple[int, int] = (2, 8)
    stage_depth: tuple[int, int] = (1, 4)
    class_token_prob: float = 0.5
    grid_prob: float = 0.5
    min_macs: float = 2e7
    max_macs: float = 1.2e9
    max_elements: float = 4e7
    guard_attempts: int = 30


DEFAULT_TRANSFORMER_SPACE = TransformerSpace()


@dataclass(frozen=True)
class _Plan:
    layout: Layout
    side: int
    head_channels: int
    heads: int
    mlp_ratio: float
    activation: Op
    patch: int
    window: int
    depths: tuple[int, ...]  # blocks per attention stage
    conv_stages: int  # hybrid: inverted-residual stages before attention
    class_token: bool
    grid: tuple[bool, ...]  # hybrid: per block of a stage, dilated across the map
    classes: int


def _draw_plan(draw: Draw, space: TransformerSpace) -> _Plan:
    layout = draw.weighted(space.layouts)
    side = 16 * draw.integer(-(-space.resolution[0] // 16), space.resolution[1] // 16)
    stage_count = {Layout.GLOBAL: 1, Layout.WINDOWED: draw.integer(2, 4), Layout.HYBRID: draw.integer(1, 2)}
    depth_range = space.global_depth if layout is Layout.GLOBAL else space.stage_depth
    depths = tuple(draw.integer(*depth_range) for _ in range(stage_count[layout]))
    return _Plan(
        layout=layout,
        side=side,
        head_channels=draw.pick(space.head_channels),
        heads=draw.integer(*space.heads),
        mlp_ratio=draw.pick(space.mlp_ratios),
        activation=draw.weighted(space.activations),
        patch=draw.pick(space.patches),
        window=draw.pick(space.windows),
        depths=depths,
        conv_stages=draw.integer(1, 2),
        class_token=draw.chance(space.class_token_prob),
        grid=tuple(draw.chance(space.grid_prob) for _ in range(max(depths))),
        classes=draw.pick((10, 100, 1000)),
    )


class _Realiser:
    """A plan realised as one network at one scale."""

    def __init__(self, plan: _Plan, scale: Scale, space: TransformerSpace) -> None:
        self.plan, self.scale, self.space = plan, scale, space
        self.g = GraphBuilder()

    def channels(self, stage: int) -> int:
        """The embedding of attention stage `stage`: whole heads, doubling from stage to stage."""
        plan = self.plan
        heads = max(1, round(plan.heads * self.scale.width)) * 2**stage
        return min(
            heads * plan.head_channels, self.space.max_channels // plan.head_channels * plan.head_channels
        )

    def side(self) -> int:
        low, high = self.space.resolution
        return max(low, min(high, 16 * round(self.plan.side * self.scale.resolution / 16)))

    def depth(self, planned: int) -> int:
        return planned if self.scale.max_blocks is None else max(1, min(planned, self.scale.max_blocks))

    def network(self, name: str, family: str) -> Network:
        side = self.side()
        x = Tensor(NETWORK_INPUT, 3, (side, side))
        layout = self.plan.layout
        x = self.global_layout(x) if layout is Layout.GLOBAL else self.staged_layout(x)
        x = self.g.flatten("head", x)
        out = self.g.linear("head", x, self.plan.classes)
        return Network(
            name=name, family=family, input_shape=(1, 3, side, side), layers=self.g.layers, outputs=[out.name]
        )

    def block(
        self,
        scope: str,
        x: Tensor,
        heads: int,
        window: tuple[int, int],
        dilation: tuple[int, int] = (1, 1),
        shift: tuple[int, int] = (0, 0),
        position_bias: bool = False,
    ) -> Tensor:
        """A pre-norm block: attention with `heads` heads over `window`-sized windows, then the MLP."""
        g, plan = self.g, self.plan
        y = g.unary(scope, Op.LAYERNORM, x)
        y = g.add(
            scope,
            Op.ATTENTION,
            [y],
            x.channels,
            kernel=window,
            groups=heads,
            bias=True,
            dilation=dilation,
            shift=shift,
            position_bias=position_bias,
        )
        x = g.merge(scope, Op.ADD, [x, y])
        y = g.unary(scope, Op.LAYERNORM, x)
        y = g.conv(scope, y, round(x.channels * plan.mlp_ratio), bias=True)
        y = g.unary(scope, plan.activation, y)
        y = g.conv(scope, y, x.channels, bias=True)
        return g.merge(scope, Op.ADD, [x, y])

    def global_layout(self, x: Tensor) -> Tensor:
        g, plan = self.g, self.plan
        channels = self.channels(0)
        patch = min(plan.patch, x.hw[0] // 2)
        x = g.add(
            "patch",
            Op.CONV2D,
            [x],
            channels,
            out_hw=(x.hw[0] // patch, x.hw[1] // patch),
            kernel=(patch, patch),
            stride=(patch, patch),
            bias=True,
        )
        x = g.add("patch", Op.TOKENS, [x], channels, out_hw=(1, x.hw[0] * x.hw[1]))
        if plan.class_token:
            x = g.add("patch", Op.CLASS_TOKEN, [x], channels, out_hw=(1, x.hw[1] + 1))
        x = g.unary("patch", Op.POSITION_EMBEDDING, x)
        for index in range(self.depth(plan.depths[0])):
            x = self.block(f"block{index}", x, channels // plan.head_channels, x.hw)
        x = g.unary("head", Op.LAYERNORM, x)
        if plan.class_token:
            return g.add("head", Op.TOKEN_SELECT, [x], channels, out_hw=(1, 1))
        return g.global_pool("head", x)

    def staged_layout(self, x: Tensor) -> Tensor:
        g, plan = self.g, self.plan
        if plan.layout is Layout.WINDOWED:
            x = g.conv("patch", x, self.channels(0), kernel=4, stride=4, bias=True)
            x = g.unary("patch", Op.LAYERNORM, x)
        else:
            x = self.conv_stages(x)
        for stage, planned in enumerate(plan.depths):
            channels = self.channels(stage)
            scope = f"stage{stage}"
            if plan.layout is Layout.HYBRID:
                x = g.conv_bn_act(scope, x, channels, None, kernel=3, stride=2)
            elif stage > 0:
                x = g.add(
                    scope, Op.SPACE_TO_DEPTH, [x], 4 * x.channels, out_hw=(-(-x.hw[0] // 2), -(-x.hw[1] // 2))
                )
                x = g.unary(scope, Op.LAYERNORM, x)
                x = g.conv(scope, x, channels)
            for index in range(self.depth(planned)):
                x = self.windowed_block(f"{scope}.block{index}", x, index)
        x = g.unary("head", Op.LAYERNORM, x)
        return g.global_pool("head", x)

    def windowed_block(self, scope: str, x: Tensor, index: int) -> Tensor:
        plan = self.plan
        heads = x.channels // plan.head_channels
        window = (min(plan.window, x.hw[0]), min(plan.window, x.hw[1]))
        if plan.layout is Layout.HYBRID and plan.grid[index] and min(x.hw) >= 2 * plan.window:
            dilation = (x.hw[0] // plan.window, x.hw[1] // plan.window)
            return self.block(scope, x, heads, window, dilation=dilation, position_bias=True)
        shifted = plan.layout is Layout.WINDOWED and index % 2 == 1 and min(x.hw) > plan.window
        shift = (window[0] // 2, window[1] // 2) if shifted else (0, 0)
        return self.block(scope, x, heads, window, shift=shift, position_bias=True)

    def conv_stages(self, x: Tensor) -> Tensor:
        """The hybrid layout's conv stem and stride-2 inverted residuals (expansion 4, SiLU)."""
        g = self.g
        channels = max(16, self.channels(0) // 2)
        x = g.conv_bn_act("stem", x, channels, Op.SILU, kernel=3, stride=2)
        for stage in range(self.plan.conv_stages):
            scope = f"conv{stage}"
            hidden = 4 * channels
            y = g.conv_bn_act(scope, x, hidden, Op.SILU)
            y = g.conv_bn_act(scope, y, hidden, Op.SILU, kernel=3, stride=2, groups=hidden)
            x = g.conv_bn_act(scope, y, channels, None)
        return x


def _elements(network: Network) -> int:
    """Elements summed over every layer's output and every attention layer's scores."""
    batch = network.input_shape[0]
    scores = sum(attention_scores(layer, batch) for layer in network.layers if layer.op is Op.ATTENTION)
    return feature_elements(network) + scores


def generate_transformer(
    seed: int, name: str, family: str, space: TransformerSpace = DEFAULT_TRANSFORMER_SPACE
) -> Network:
    """The transformer-style network of `seed`, rescaled (heads and resolution, then depth) until
    its MACs lie in [min_macs, max_macs] and its elements under `max_elements`.

    Raises:
        GenerationError: no rescaling within `guard_attempts` fits the bounds.
    """
    plan = _draw_plan(Draw(seed), space)
    scale = Scale()
    macs, elements = 0, 0
    previous: tuple[int, int] | None = None
    for _ in range(space.guard_attempts):
        network = _Realiser(plan, scale, space).network(name, family)
        macs, elements = network_cost(network).macs, _elements(network)
        too_large = macs > space.max_macs or elements > space.max_elements
        if macs >= space.min_macs and not too_large:
            return network
        if (macs, elements) == previous:
            depth = scale.max_blocks or max(plan.depths)
            if macs < space.min_macs or depth <= 1:
                break
            scale, previous = replace(scale, max_blocks=depth - 1), None
            continue
        if too_large:
            step = min(0.9 * space.max_macs / macs, 0.9 * space.max_elements / elements) ** 0.5
        else:
            step = (1.25 * space.min_macs / macs) ** 0.5
        scale = replace(scale, width=scale.width * step, resolution=scale.resolution * step**0.5)
        previous = (macs, elements)
    raise GenerationError(
        f"transformer network {name!r} still has {macs:.3g} MACs and {elements:.3g} elements after "
        f"{space.guard_attempts} rebuilds, outside its bounds (MACs in [{space.min_macs:.3g}, "
        f"{space.max_macs:.3g}], elements up to {space.max_elements:.3g})",
        {"name": name, "macs": macs, "elements": elements},
    )
