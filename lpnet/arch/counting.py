"""FLOPs and parameter counts of an IR network.

Convention: `macs` counts the multiply-accumulates of convolutions and linear layers (what
torchvision's model tables call "GFLOPS"); `flops` is 2 * macs plus one operation per output
element of every other layer (batch norm, activations, pooling windows, adds and muls), with these
per-element counts: a layer norm or softmax 5 (statistics and normalisation), an LRN one per channel
of its window, a bilinear upsample 4 (its four taps); data movement (concat, flatten, slice, channel
shuffle, zero padding, nearest upsampling, token re-arrangements) counts none.

An `attention` layer's MACs are those of its four projections (query, key and value, and output:
4 * C^2 per position) and of its two products within each window (scores and the weighted sum of
values: 2 * L * C per position, L positions to a window), over the map padded to whole windows; its
FLOPs add the softmax of the scores (5 per score) and, with a position bias, its addition.
"""

from __future__ import annotations

from dataclasses import dataclass

from lpnet.arch.ir import Layer, Network, Op


@dataclass(frozen=True)
class LayerCost:
    macs: int
    flops: int
    params: int


def layer_cost(layer: Layer, batch: int = 1) -> LayerCost:
    """MACs, FLOPs and parameters of one layer for a batch of `batch` inputs."""
    out_elems = batch * layer.out_channels * layer.out_hw[0] * layer.out_hw[1]
    if layer.op is Op.CONV2D:
        per_output = (layer.in_channels // layer.groups) * layer.kernel[0] * layer.kernel[1]
        macs = out_elems * per_output
        params = layer.out_channels * per_output + (layer.out_channels if layer.bias else 0)
        return LayerCost(macs, 2 * macs + (out_elems if layer.bias else 0), params)
    if layer.op is Op.LINEAR:
        macs = batch * layer.in_channels * layer.out_channels
        params = layer.in_channels * layer.out_channels + (layer.out_channels if layer.bias else 0)
        return LayerCost(macs, 2 * macs + (out_elems if layer.bias else 0), params)
    if layer.op is Op.ATTENTION:
        return attention_cost(layer, batch)
    if layer.op is Op.POSITION_EMBEDDING:
        return LayerCost(0, out_elems, out_elems // batch)
    if layer.op is Op.CLASS_TOKEN:
        return LayerCost(0, 0, layer.out_channels)
    if layer.op is Op.BATCHNORM2D:
        return LayerCost(0, 2 * out_elems, 2 * layer.out_channels)
    if layer.op in (Op.MAXPOOL2D, Op.AVGPOOL2D):
        return LayerCost(0, out_elems * layer.kernel[0] * layer.kernel[1], 0)
    if layer.op is Op.ADAPTIVE_AVGPOOL2D:
        return LayerCost(0, batch * layer.in_channels * layer.in_hw[0] * layer.in_hw[1], 0)
    if layer.op in (
        Op.CONCAT,
        Op.FLATTEN,
        Op.SLICE,
        Op.CHANNEL_SHUFFLE,
        Op.PAD,
        Op.UPSAMPLE_NEAREST,
        Op.TOKENS,
        Op.TOKEN_SELECT,
        Op.SPACE_TO_DEPTH,
    ):
        return LayerCost(0, 0, 0)
    if layer.op is Op.LAYERNORM:
        return LayerCost(0, 5 * out_elems, 2 * layer.out_channels)
    if layer.op is Op.SOFTMAX:
        return LayerCost(0, 5 * out_elems, 0)
    if layer.op is Op.LRN:
        return LayerCost(0, out_elems * layer.kernel[0], 0)
    if layer.op is Op.UPSAMPLE_BILINEAR:
        return LayerCost(0, 4 * out_elems, 0)
    if layer.op in (Op.ADD, Op.MUL):
        return LayerCost(0, out_elems * (len(layer.inputs) - 1), 0)
    return LayerCost(0, out_elems, 0)  # activations


def attention_positions(layer: Layer, batch: int = 1) -> int:
    """Positions an `attention` layer computes on: its map padded to whole windows, times the batch."""
    spans = [k * d for k, d in zip(layer.kernel, layer.dilation, strict=True)]
    padded_hw = [-(-size // span) * span for size, span in zip(layer.in_hw, spans, strict=True)]
    return batch * padded_hw[0] * padded_hw[1]


def attention_scores(layer: Layer, batch: int = 1) -> int:
    """Elements of an `attention` layer's score tensor: one per head, position and window position."""
    return attention_positions(layer, batch) * layer.groups * layer.kernel[0] * layer.kernel[1]


def attention_cost(layer: Layer, batch: int = 1) -> LayerCost:
    """MACs, FLOPs and parameters of an `attention` layer (see the module docstring)."""
    channels = layer.in_channels
    window = layer.kernel[0] * layer.kernel[1]
    positions = attention_positions(layer, batch)
    macs = positions * (4 * channels * channels + 2 * window * channels)
    scores = attention_scores(layer, batch)
    params = 4 * channels * channels + (4 * channels if layer.bias else 0)
    if layer.position_bias:
        params += (2 * layer.kernel[0] - 1) * (2 * layer.kernel[1] - 1) * layer.groups
    flops = 2 * macs + 5 * scores + (scores if layer.position_bias else 0)
    return LayerCost(macs, flops, params)


@dataclass(frozen=True)
class NetworkCost:
    macs: int
    flops: int
    params: int


def network_cost(network: Network) -> NetworkCost:
    """Total MACs, FLOPs and parameters of a network at its input batch size."""
    batch = network.input_shape[0]
    costs = [layer_cost(layer, batch) for layer in network.layers]
    return NetworkCost(
        macs=sum(c.macs for c in costs),
        flops=sum(c.flops for c in costs),
        params=sum(c.params for c in costs),
    )
