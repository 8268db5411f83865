"""An op_coverage family: one synthetic network that holds every operator the IR knows.

A device profile built only from torchvision families measures only the operators those families
use: without efficientnet_b0 no `silu` and no `sigmoid` is ever timed, and a predictor can only
guess their cost from the other activations (on a 2-core AMD EPYC, silu cost 2.4 times that guess,
and efficientnet_b0 came out 13 % too fast). Profiling this network alongside the families gives
every operator measured costs at several resolutions and, through the sampler's width variants,
several channel counts, whatever families a profile covers; nn-Meter measures kernels
independently of models for the same reason.

The network is small (at 224x224, 121 M MACs against mobilenet_v2's 301 M) and prunable like any
family: its channel groups come from torch-pruning's dependency graph, so the sampler varies them.
Groups whose channels reach its slices, its channel shuffle or its transformer ops keep their width
(`lpnet.arch.groups`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lpnet.arch.ir import Network
from profiler.family_names import OP_COVERAGE_FAMILY, WIDE_DENSE_FAMILY
from profiler.wide_dense import wide_dense_network


def _conv_bn(
    in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class OpCoverageNet(nn.Module):
    """Every IR operator at least once; relu6 and silu at two resolutions.

    stem (conv, BN, relu) -> maxpool -> an inverted-residual block (relu6, depthwise silu, add) ->
    squeeze-and-excitation (adaptive pooling, gelu, sigmoid, mul) -> two branches (tanh; avgpool and
    hardswish) concatenated -> a ShuffleNet unit (a chunk into two channel slices, one through convs
    and LRN, concatenated and channel-shuffled) -> a stride-2 block (hardsigmoid, relu6, silu) -> a
    context branch (zero pad, stride-2 conv, nearest and bilinear upsampling, channel softmax) beside a
    channels-last layer norm -> both pooled, concatenated and classified, with a transformer branch:
    Swin's shifted-window attention and patch merging on a channels-last map, then ViT's tokens,
    class token, position embedding, attention over all tokens and the class token's output.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 24, 3, 2), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.expand = nn.Sequential(*_conv_bn(24, 64), nn.ReLU6())
        self.depthwise = nn.Sequential(*_conv_bn(64, 64, 3, groups=64), nn.SiLU())
        self.project = nn.Sequential(*_conv_bn(64, 24))
        self.squeeze = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 8, 1), nn.GELU(), nn.Conv2d(8, 24, 1), nn.Sigmoid()
        )
        self.left = nn.Sequential(*_conv_bn(24, 32, 3), nn.Tanh())
        self.right = nn.Sequential(nn.AvgPool2d(3, 1, 1), *_conv_bn(24, 32), nn.Hardswish())
        self.shuffle_branch = nn.Sequential(
            *_conv_bn(32, 48), nn.ReLU(), nn.LocalResponseNorm(5), *_conv_bn(48, 32)
        )
        self.down = nn.Sequential(*_conv_bn(64, 96, 3, 2), nn.Hardsigmoid())
        self.mix = nn.Sequential(*_conv_bn(96, 96, 3, groups=96), nn.ReLU6(), *_conv_bn(96, 128), nn.SiLU())
        self.reduce = nn.Sequential(nn.Conv2d(128, 32, 1), nn.ReLU())
        self.context = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(32, 32, 3, 2))
        self.norm = nn.LayerNorm(128)
        self.pool_main = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.pool_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.window_input = nn.Conv2d(128, 32, 1)
        self.window_norm = nn.LayerNorm(32)
        # Imported here: torchvision costs seconds to import, and most users of this module only
        # need the family's name.
        from torchvision.models.swin_transformer import PatchMerging, ShiftedWindowAttention

        self.window_attention = ShiftedWindowAttention(32, [4, 4], [2, 2], num_heads=2)
        self.merge = PatchMerging(32)
        self.token_pool = nn.AdaptiveAvgPool2d(2)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 64))
        self.position_embedding = nn.Parameter(torch.zeros(1, 5, 64))
        self.attention = nn.MultiheadAttention(64, num_heads=4, batch_first=True)
        self.classifier = nn.Linear(224, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = x + self.project(self.depthwise(self.expand(x)))
        x = x * self.squeeze(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        kept, branch = x.chunk(2, dim=1)
        x = F.channel_shuffle(torch.cat([kept, self.shuffle_branch(branch)], dim=1), 2)
        x = self.mix(self.down(x))
        context = F.interpolate(self.context(self.reduce(x)), scale_factor=2, mode="nearest")
        context = F.interpolate(context, scale_factor=2, mode="bilinear", align_corners=False)
        context = F.softmax(context, dim=1)
        token = self._transformer(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.classifier(torch.cat([self.pool_main(x), self.pool_context(context), token], dim=1))

    def _transformer(self, x: torch.Tensor) -> torch.Tensor:
        windows = self.window_input(x).permute(0, 2, 3, 1)
        windows = windows + self.window_attention(self.window_norm(windows))
        grid = self.token_pool(self.merge(windows).permute(0, 3, 1, 2))
        n, c, h, w = grid.shape
        tokens = grid.reshape(n, c, h * w).permute(0, 2, 1)
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1) + self.position_embedding
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
        return tokens[:, 0]


def op_coverage_network(input_shape: Sequence[int] = (1, 3, 224, 224)) -> Network:
    """The op-coverage network's IR for an (N, C, H, W) input (shapes only: the IR holds no weights)."""
    from lpnet.arch.from_torch import network_from_module

    module = OpCoverageNet(in_channels=int(input_shape[1])).eval()
    return network_from_module(module, input_shape, name=OP_COVERAGE_FAMILY, family=OP_COVERAGE_FAMILY)


# The synthetic families a profile can name beside torchvision's models, by name: each builds its
# network's IR for an (N, C, H, W) input.
SYNTHETIC_FAMILIES: dict[str, Callable[[Sequence[int]], Network]] = {
    OP_COVERAGE_FAMILY: op_coverage_network,
    WIDE_DENSE_FAMILY: wide_dense_network,
}
