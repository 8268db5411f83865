"""The graph builder: appends IR layers with consistent names and shapes for the blocks to compose."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lpnet.arch.ir import Layer, Op, conv_output_hw


@dataclass(frozen=True)
class Tensor:
    name: str
    channels: int
    hw: tuple[int, int]


class GraphBuilder:
    """Appends IR layers with consistent shapes; each call returns the tensor the new layer produces."""

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self._names: set[str] = set()

    def add(
        self,
        scope: str,
        op: Op,
        inputs: Sequence[Tensor],
        out_channels: int,
        out_hw: tuple[int, int] | None = None,
        **fields: Any,
    ) -> Tensor:
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
        return Tensor(name, out_channels, layer.out_hw)

    def conv(
        self,
        scope: str,
        x: Tensor,
        out_channels: int,
        kernel: int | tuple[int, int] = 1,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = False,
    ) -> Tensor:
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

    def unary(self, scope: str, op: Op, x: Tensor) -> Tensor:
        return self.add(scope, op, [x], x.channels)

    def conv_bn_act(
        self,
        scope: str,
        x: Tensor,
        out_channels: int,
        activation: Op | None,
        kernel: int | tuple[int, int] = 1,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        batchnorm: bool = True,
    ) -> Tensor:
        y = self.conv(scope, x, out_channels, kernel, stride, groups, dilation, bias=not batchnorm)
        if batchnorm:
            y = self.unary(scope, Op.BATCHNORM2D, y)
        return self.unary(scope, activation, y) if activation is not None else y

    def pool(
        self,
        scope: str,
        op: Op,
        x: Tensor,
        kernel: int,
        stride: int,
        padding: int = 0,
        ceil_mode: bool = False,
    ) -> Tensor:
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

    def halving_pool(self, scope: str, op: Op, x: Tensor) -> Tensor:
        """A stride-2 pool: 3x3 padded for max pooling (ResNet's stem), 2x2 for average (DenseNet)."""
        if op is Op.MAXPOOL2D:
            return self.pool(scope, op, x, 3, 2, padding=1)
        return self.pool(scope, op, x, 2, 2, ceil_mode=True)

    def merge(self, scope: str, op: Op, inputs: Sequence[Tensor]) -> Tensor:
        out = sum(t.channels for t in inputs) if op is Op.CONCAT else inputs[0].channels
        return self.add(scope, op, inputs, out)

    def global_pool(self, scope: str, x: Tensor, side: int = 1) -> Tensor:
        """An adaptive average pool to `side` positions a side (1: the global mean), at most the map's."""
        out_hw = (min(side, x.hw[0]), min(side, x.hw[1]))
        return self.add(scope, Op.ADAPTIVE_AVGPOOL2D, [x], x.channels, out_hw=out_hw)

    def flatten(self, scope: str, x: Tensor) -> Tensor:
        return self.add(scope, Op.FLATTEN, [x], x.channels * x.hw[0] * x.hw[1], out_hw=(1, 1))

    def linear(self, scope: str, x: Tensor, out_features: int) -> Tensor:
        return self.add(scope, Op.LINEAR, [x], out_features, bias=True)


def _fit_kernel(kernel: int, side: int) -> int:
    """The kernel, cut to the largest odd size within the feature map (3 at least)."""
    return min(kernel, max(3, side if side % 2 else side - 1))
