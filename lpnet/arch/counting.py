"""FLOPs and parameter counts of an IR network.

Convention: `macs` counts the multiply-accumulates of convolutions and linear layers (what
torchvision's model tables call "GFLOPS"); `flops` is 2 * macs plus one operation per output
element of every other layer (batch norm, activations, pooling windows, adds and muls).
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
    if layer.op is Op.BATCHNORM2D:
        return LayerCost(0, 2 * out_elems, 2 * layer.out_channels)
    if layer.op in (Op.MAXPOOL2D, Op.AVGPOOL2D):
        return LayerCost(0, out_elems * layer.kernel[0] * layer.kernel[1], 0)
    if layer.op is Op.ADAPTIVE_AVGPOOL2D:
        return LayerCost(0, batch * layer.in_channels * layer.in_hw[0] * layer.in_hw[1], 0)
    if layer.op in (Op.CONCAT, Op.FLATTEN):
        return LayerCost(0, 0, 0)
    if layer.op in (Op.ADD, Op.MUL):
        return LayerCost(0, out_elems * (len(layer.inputs) - 1), 0)
    return LayerCost(0, out_elems, 0)  # activations


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
