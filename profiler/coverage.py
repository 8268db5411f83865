"""An op_coverage family: one synthetic network that holds every operator the IR knows.

A device profile built only from torchvision families measures only the operators those families
use: without efficientnet_b0 no `silu` and no `sigmoid` is ever timed, and a predictor can only
guess their cost from the other activations (on a 2-core AMD EPYC, silu cost 2.4 times that guess,
and efficientnet_b0 came out 13 % too fast). Profiling this network alongside the families gives
every operator measured costs at several resolutions and, through the sampler's width variants,
several channel counts, whatever families a profile covers; nn-Meter measures kernels
independently of models for the same reason.

The network is small (about 10 ms on one core of a 2-core AMD EPYC at 224x224, against 18 ms for
mobilenet_v2) and prunable like any family: its channel groups come from torch-pruning's dependency
graph, so the sampler varies them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lpnet.arch.ir import Network

OP_COVERAGE_FAMILY = "op_coverage"


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
    hardswish) concatenated -> a stride-2 block (hardsigmoid, relu6, silu) -> pooled classifier.
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
        self.down = nn.Sequential(*_conv_bn(64, 96, 3, 2), nn.Hardsigmoid())
        self.mix = nn.Sequential(*_conv_bn(96, 96, 3, groups=96), nn.ReLU6(), *_conv_bn(96, 128), nn.SiLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = x + self.project(self.depthwise(self.expand(x)))
        x = x * self.squeeze(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(self.mix(self.down(x)))


def op_coverage_network(input_shape: Sequence[int] = (1, 3, 224, 224)) -> Network:
    """The op-coverage network's IR for an (N, C, H, W) input (shapes only: the IR holds no weights)."""
    from lpnet.arch.from_torch import network_from_module

    module = OpCoverageNet(in_channels=int(input_shape[1])).eval()
    return network_from_module(module, input_shape, name=OP_COVERAGE_FAMILY, family=OP_COVERAGE_FAMILY)
