"""How the sampler varies what it measures: Latin-hypercube width ratios, widths rounded to each
group's divisor, layers with scaled channel counts, and which operators are timed on their own."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from lpnet.arch.ir import Layer, Op

logger = logging.getLogger(__name__)

# Layer ops worth timing on their own; flatten, concat and slice are views or plain copies.
ISOLATED_OPS = frozenset(
    {
        Op.CONV2D,
        Op.LINEAR,
        Op.BATCHNORM2D,
        Op.RELU,
        Op.RELU6,
        Op.SILU,
        Op.GELU,
        Op.SIGMOID,
        Op.TANH,
        Op.HARDSWISH,
        Op.HARDSIGMOID,
        Op.MAXPOOL2D,
        Op.AVGPOOL2D,
        Op.ADAPTIVE_AVGPOOL2D,
        Op.ADD,
        Op.MUL,
        Op.LRN,
        Op.PAD,
        Op.SOFTMAX,
        Op.CHANNEL_SHUFFLE,
        Op.UPSAMPLE_NEAREST,
        Op.UPSAMPLE_BILINEAR,
        Op.LAYERNORM,
    }
)


def latin_hypercube(rng: np.random.Generator, n: int, dims: int, low: float, high: float) -> np.ndarray:
    """`n` points in [low, high]^dims, each dimension hitting every one of n strata once."""
    strata = np.stack([rng.permutation(n) for _ in range(dims)], axis=1)  # (n, dims)
    unit = (strata + rng.random((n, dims))) / n
    return low + unit * (high - low)


def widths_from_ratios(
    ratios: Sequence[float], channels: Sequence[int], divisors: Sequence[int]
) -> list[int]:
    """Kept channels per group: ratio x channels, rounded to the group's divisor, at least one divisor."""
    widths = []
    for ratio, full, divisor in zip(ratios, channels, divisors, strict=True):
        units = min(max(1, full // divisor), max(1, round(ratio * full / divisor)))
        widths.append(units * divisor)
    return widths


def _scaled(channels: int, ratio: float) -> int:
    return max(1, round(channels * ratio))


def scale_layer(layer: Layer, r_in: float, r_out: float) -> Layer | None:
    """`layer` with channel counts scaled by the ratios, keeping it valid (None if it cannot be).

    A conv reading the image (<= 4 input channels) keeps its input; depthwise convs stay depthwise;
    grouped convs keep their group width and scale the number of groups.
    """
    update: dict[str, Any] = {}
    if layer.op is Op.CONV2D:
        if layer.is_depthwise:
            c = _scaled(layer.in_channels, r_in)
            multiplier = layer.out_channels // layer.in_channels
            update = {"in_channels": c, "out_channels": c * multiplier, "groups": c}
        elif layer.groups > 1:
            groups = _scaled(layer.groups, r_in)
            update = {
                "in_channels": groups * (layer.in_channels // layer.groups),
                "out_channels": groups * (layer.out_channels // layer.groups),
                "groups": groups,
            }
        else:
            c_in = layer.in_channels if layer.in_channels <= 4 else _scaled(layer.in_channels, r_in)
            update = {"in_channels": c_in, "out_channels": _scaled(layer.out_channels, r_out)}
    elif layer.op is Op.LINEAR:
        update = {
            "in_channels": _scaled(layer.in_channels, r_in),
            "out_channels": _scaled(layer.out_channels, r_out),
        }
    elif layer.op in ISOLATED_OPS:
        c = _scaled(layer.in_channels, r_in)
        update = {"in_channels": c, "out_channels": c}
    else:
        return None
    try:
        return Layer.model_validate({**layer.model_dump(), **update})
    except ValueError:
        logger.debug("scaled layer %s is not valid: %s", layer.name, update)
        return None
