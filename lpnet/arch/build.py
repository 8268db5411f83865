"""Materialise an IR network as a real nn.Module (a torch.fx GraphModule) with random weights."""

from __future__ import annotations

import keyword
import operator
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lpnet.arch.ir import NETWORK_INPUT, UPSAMPLES, Layer, Network, Op

# Key of GraphModule.meta mapping fx node names to IR layer names (fx renames dotted names).
IR_LAYER_META = "lpnet_ir_layer"

_ACTIVATIONS: dict[Op, type[nn.Module]] = {
    Op.RELU: nn.ReLU,
    Op.RELU6: nn.ReLU6,
    Op.SILU: nn.SiLU,
    Op.GELU: nn.GELU,
    Op.SIGMOID: nn.Sigmoid,
    Op.TANH: nn.Tanh,
    Op.HARDSWISH: nn.Hardswish,
    Op.HARDSIGMOID: nn.Hardsigmoid,
}


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle as it writes it: reshape to (N, groups, C / groups, H, W),
    swap the two channel axes, reshape back. Exported to ONNX as Reshape, Transpose, Reshape."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        x = x.view(n, self.groups, c // self.groups, h, w)
        return torch.transpose(x, 1, 2).contiguous().view(n, c, h, w)


class ChannelLayerNorm(nn.LayerNorm):
    """Layer norm over the channels at each position of an (N, C, H, W) tensor, computed channels-last
    as ConvNeXt does (permute, layer norm over the last dimension, permute back)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _LrnFunction(torch.autograd.Function):
    """Local response normalisation that exports to ONNX as one LRN node, not its decomposition."""

    @staticmethod
    def forward(_ctx: Any, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g: Any, x: Any, size: int, alpha: float, beta: float, k: float) -> Any:
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LocalResponseNorm(nn.LocalResponseNorm):
    """nn.LocalResponseNorm exported to ONNX as an LRN node."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = _LrnFunction.apply(x, self.size, self.alpha, self.beta, self.k)
        return output


class Tokens(nn.Module):
    """A (N, C, H, W) map as the token sequence of its positions, (N, C, 1, H*W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).unsqueeze(2)


class ClassToken(nn.Module):
    """A learned token put before a (N, C, 1, L) sequence (ViT's class token)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1, -1), x], dim=3)


class PositionEmbedding(nn.Module):
    """Adds a learned tensor of the input's (C, H, W) shape."""

    def __init__(self, channels: int, hw: tuple[int, int]) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(1, channels, *hw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding


class TokenSelect(nn.Module):
    """The first position of a map as (N, C) features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0]


class SpaceToDepth(nn.Module):
    """Swin's patch merging on an NCHW map: an odd H or W zero-padded, each 2x2 block of positions
    stacked into the channels in the order (0, 0), (1, 0), (0, 1), (1, 1). Its input is (H, W)."""

    def __init__(self, hw: tuple[int, int]) -> None:
        super().__init__()
        self.padding = (0, hw[1] % 2, 0, hw[0] % 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = F.pad(x, self.padding)
        blocks = [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]]
        return torch.cat(blocks, dim=1)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows of an NCHW map, as an `attention` layer describes.

    A window is `window` positions spaced by `dilation` (MaxViT's grid attention dilates windows
    across the whole map). The map is zero-padded to whole windows and rolled by `shift`, each window's positions attend
    to each other through `F.scaled_dot_product_attention` (with a learned bias per head and
    relative position when `position_bias`), and the result is rolled back and cropped. A window
    the size of the map is attention over all positions (ViT).
    """

    def __init__(
        self,
        channels: int,
        hw: tuple[int, int],
        heads: int,
        window: tuple[int, int],
        shift: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        bias: bool = True,
        position_bias: bool = False,
    ) -> None:
        super().__init__()
        self.hw, self.heads, self.window, self.shift, self.dilation = hw, heads, window, shift, dilation
        span = (window[0] * dilation[0], window[1] * dilation[1])
        self.padding = (0, 0, 0, -hw[1] % span[1], 0, -hw[0] % span[0])
        self.qkv = nn.Linear(channels, 3 * channels, bias=bias)
        self.proj = nn.Linear(channels, channels, bias=bias)
        self.position_bias: nn.Parameter | None = None
        if position_bias:
            length = window[0] * window[1]
            self.position_bias = nn.Parameter(torch.zeros(1, heads, length, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        (h, w), (wh, ww), (sh, sw), (dh, dw) = self.hw, self.window, self.shift, self.dilation
        x = x.permute(0, 2, 3, 1)
        if any(self.padding):
            x = F.pad(x, self.padding)
        ph, pw = h + self.padding[5], w + self.padding[3]
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        # Position a * (wh * dh) + i * dh + j of a row is position i of window (a, j).
        blocks = (n, ph // (wh * dh), wh, dh, pw // (ww * dw), ww, dw, c)
        x = x.reshape(blocks).permute(0, 1, 3, 4, 6, 2, 5, 7).reshape(-1, wh * ww, c)
        qkv = self.qkv(x).reshape(x.shape[0], wh * ww, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias)
        x = self.proj(x.transpose(1, 2).reshape(-1, wh * ww, c))
        windows = (n, blocks[1], dh, blocks[4], dw, wh, ww, c)
        x = x.reshape(windows).permute(0, 1, 5, 2, 3, 6, 4, 7).reshape(n, ph, pw, c)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :h, :w, :].permute(0, 3, 1, 2)


# Ops whose output is (N, F) whatever their input, and ops whose output is a map whatever their input.
_FLATTENING = frozenset({Op.FLATTEN, Op.LINEAR, Op.TOKEN_SELECT})
_UNFLATTENING = frozenset({Op.CONV2D, Op.MAXPOOL2D, Op.AVGPOOL2D, Op.ADAPTIVE_AVGPOOL2D, Op.PAD} | UPSAMPLES)


def layer_module(layer: Layer, features: bool = False) -> nn.Module | None:
    """The nn.Module computing one IR layer, or None for ops that are plain functions (add, cat...).

    `features`: the layer's input is a flattened (N, F) tensor rather than an (N, C, H, W) map.
    """
    if layer.op is Op.CONV2D:
        return nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            kernel_size=layer.kernel,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias,
        )
    if layer.op is Op.LINEAR:
        return nn.Linear(layer.in_channels, layer.out_channels, bias=layer.bias)
    if layer.op is Op.BATCHNORM2D:
        return nn.BatchNorm2d(layer.in_channels)
    if layer.op in _ACTIVATIONS:
        return _ACTIVATIONS[layer.op]()
    if layer.op is Op.MAXPOOL2D:
        return nn.MaxPool2d(
            layer.kernel, layer.stride, layer.padding, layer.dilation, ceil_mode=layer.ceil_mode
        )
    if layer.op is Op.AVGPOOL2D:
        return nn.AvgPool2d(layer.kernel, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
    if layer.op is Op.ADAPTIVE_AVGPOOL2D:
        return nn.AdaptiveAvgPool2d(layer.out_hw)
    if layer.op is Op.LRN:
        return LocalResponseNorm(layer.kernel[0])
    if layer.op is Op.PAD:
        (top, left) = layer.padding
        return nn.ZeroPad2d((left, left, top, top))
    if layer.op is Op.SOFTMAX:
        return nn.Softmax(dim=1)
    if layer.op is Op.CHANNEL_SHUFFLE:
        return ChannelShuffle(layer.groups)
    if layer.op is Op.LAYERNORM:
        return nn.LayerNorm(layer.in_channels, eps=1e-6) if features else ChannelLayerNorm(layer.in_channels)
    if layer.op is Op.TOKENS:
        return Tokens()
    if layer.op is Op.CLASS_TOKEN:
        return ClassToken(layer.in_channels)
    if layer.op is Op.POSITION_EMBEDDING:
        return PositionEmbedding(layer.in_channels, layer.in_hw)
    if layer.op is Op.TOKEN_SELECT:
        return TokenSelect()
    if layer.op is Op.SPACE_TO_DEPTH:
        return SpaceToDepth(layer.in_hw)
    if layer.op is Op.ATTENTION:
        return WindowAttention(
            layer.in_channels,
            layer.in_hw,
            layer.groups,
            layer.kernel,
            layer.shift,
            layer.dilation,
            layer.bias,
            layer.position_bias,
        )
    if layer.op in UPSAMPLES:
        scale = (layer.out_hw[0] / layer.in_hw[0], layer.out_hw[1] / layer.in_hw[1])
        if layer.op is Op.UPSAMPLE_NEAREST:
            return nn.Upsample(scale_factor=scale, mode="nearest")
        return nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
    return None


def build_module(network: Network) -> fx.GraphModule:
    """Build a runnable module of the network's exact shapes, with random weights, in eval mode.

    Node names follow the IR layer names as closely as fx allows; `gm.meta[IR_LAYER_META]` maps
    each computing node's name to its IR layer name.
    """
    root = nn.Module()
    graph = fx.Graph()
    values: dict[str, fx.Node] = {NETWORK_INPUT: graph.placeholder("x")}
    node_to_layer: dict[str, str] = {}
    used_attrs: set[str] = set()
    flat: set[str] = set()  # layers whose output is a flattened (N, F) tensor
    for layer in network.layers:
        args = [values[ref] for ref in layer.inputs]
        features = layer.inputs[0] in flat
        if layer.op in _FLATTENING or (features and layer.op not in _UNFLATTENING):
            flat.add(layer.name)
        module = layer_module(layer, features)
        if module is not None:
            attr = _attribute_name(layer.name, used_attrs)
            root.add_module(attr, module)
            node = graph.call_module(attr, (args[0],))
        elif layer.op is Op.ADD or layer.op is Op.MUL:
            fn = operator.add if layer.op is Op.ADD else operator.mul
            node = graph.call_function(fn, (args[0], args[1]))
            for extra in args[2:]:
                node = graph.call_function(fn, (node, extra))
        elif layer.op is Op.CONCAT:
            node = graph.call_function(torch.cat, (args, 1))
        elif layer.op is Op.FLATTEN:
            node = graph.call_function(torch.flatten, (args[0], 1))
        elif layer.op is Op.SLICE:
            channels = slice(layer.channel_offset, layer.channel_offset + layer.out_channels)
            node = graph.call_function(operator.getitem, (args[0], (slice(None), channels)))
        else:  # pragma: no cover - every Op is handled above
            raise AssertionError(f"no builder for {layer.op}")
        values[layer.name] = node
        node_to_layer[node.name] = layer.name
    outputs = [values[name] for name in network.outputs]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    gm = fx.GraphModule(root, graph, class_name=_attribute_name(network.name or "Network", set()))
    gm.meta[IR_LAYER_META] = node_to_layer
    return gm.eval()


def _attribute_name(name: str, used: set[str]) -> str:
    base = re.sub(r"\W", "_", name)
    if not base or base[0].isdigit() or keyword.iskeyword(base):
        base = f"m_{base}"
    attr, k = base, 1
    while attr in used:
        attr = f"{base}_{k}"
        k += 1
    used.add(attr)
    return attr
