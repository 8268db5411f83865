"""The networks benches name by spec, and the wide-layer probes built for development.

A spec names one network the same way in every bench and in the fresh processes that time it:

- `tv:<torchvision name>`: the torchvision model (its IR from `lpnet.arch.from_torch`);
- `gen:<seed>`: the generator's network of that seed;
- `wide:<name>`: a wide-layer probe below, e.g. `wide:wide3x3-1024x7` or `wide:wide1x1-256x28-bias`;
- `ir:<file>`: an IR network a bench wrote to a JSON file.

The wide-layer probes are development material, built here and in no evaluation set: a light stem
(3x3 convolutions, stride 2, to 32 and then C channels at HxH), a few blocks at CxHxH, a global
pool and a classifier. A `wide1x1` block is 1x1 C->4C, ReLU, 1x1 4C->C and a residual add, once
without and once with a bias; a `wide3x3` block is 3x3 C->C, ReLU, 3x3 C->C and a residual add (a
ResNet basic block without batch norm), whose weights run from 2.4 MB to 85 MB: wider than any
convolution a first run times, and past the last-level cache of common CPUs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lpnet.arch.ir import Layer, Network, Op

# (channels, map size) of the 1x1 probes: 1x1 convolutions of 0.3 to 1.2 GMACs, at the token counts of
# vision transformers (196) and wider maps.
WIDE_1X1_SHAPES = ((256, 28), (384, 14), (512, 14), (768, 14), (1024, 7), (192, 56))
# (channels, map size) of the 3x3 probes: 3x3 convolutions of 0.46 to 1.85 GMACs.
WIDE_3X3_SHAPES = ((256, 28), (512, 14), (768, 14), (1024, 7), (1024, 14), (1536, 7))
WIDE_1X1_BLOCKS = 3
WIDE_3X3_BLOCKS = 2
EXPANSION = 4
_WIDE_NAME = re.compile(r"wide(1x1|3x3)-(\d+)x(\d+)(-bias)?")


def _layer(
    name: str, op: Op, inputs: list[str], channels: tuple[int, int], hw: tuple[int, int], **kw: Any
) -> Layer:
    """A layer from `hw` = (input size, output size) of square maps; `kw` sets kernel, stride, bias."""
    kernel, stride = kw.get("kernel", 1), kw.get("stride", 1)
    return Layer(
        name=name,
        op=op,
        inputs=inputs,
        in_channels=channels[0],
        out_channels=channels[1],
        in_hw=(hw[0], hw[0]),
        out_hw=(hw[1], hw[1]),
        kernel=(kernel, kernel),
        stride=(stride, stride),
        padding=(kernel // 2, kernel // 2),
        bias=kw.get("bias", False),
    )


def wide_network(kernel: int, channels: int, size: int, bias: bool = False) -> Network:
    """The stem, the wide blocks of `kernel` (1 or 3) at `channels` x `size` x `size`, and a classifier."""
    if kernel not in (1, 3):
        raise ValueError(f"wide probes have 1x1 or 3x3 blocks, not {kernel}x{kernel}")
    c, h = channels, size
    layers = [
        _layer("stem.0", Op.CONV2D, ["input"], (3, 32), (4 * h, 2 * h), kernel=3, stride=2),
        _layer("stem.1", Op.RELU, ["stem.0"], (32, 32), (2 * h, 2 * h)),
        _layer("stem.2", Op.CONV2D, ["stem.1"], (32, c), (2 * h, h), kernel=3, stride=2),
    ]
    x = "stem.2"
    inner = EXPANSION * c if kernel == 1 else c
    first, second = ("expand", "project") if kernel == 1 else ("conv1", "conv2")
    for b in range(WIDE_1X1_BLOCKS if kernel == 1 else WIDE_3X3_BLOCKS):
        a, r, p = f"block{b}.{first}", f"block{b}.relu", f"block{b}.{second}"
        layers += [
            _layer(a, Op.CONV2D, [x], (c, inner), (h, h), kernel=kernel, bias=bias),
            _layer(r, Op.RELU, [a], (inner, inner), (h, h)),
            _layer(p, Op.CONV2D, [r], (inner, c), (h, h), kernel=kernel, bias=bias),
            _layer(f"block{b}.add", Op.ADD, [p, x], (c, c), (h, h)),
        ]
        x = f"block{b}.add"
    layers += [
        _layer("head.pool", Op.ADAPTIVE_AVGPOOL2D, [x], (c, c), (h, 1)),
        _layer("head.flatten", Op.FLATTEN, ["head.pool"], (c, c), (1, 1)),
        _layer("head.linear", Op.LINEAR, ["head.flatten"], (c, 10), (1, 1), bias=True),
    ]
    return Network(
        name=f"wide{kernel}x{kernel}-{c}x{h}" + ("-bias" if bias else ""),
        family="wide-layers",
        input_shape=(1, 3, 4 * h, 4 * h),
        layers=layers,
        outputs=["head.linear"],
    )


def wide_networks() -> list[Network]:
    """Every wide-layer probe: the 1x1 ones without and with a bias, then the 3x3 ones."""
    out = [wide_network(1, c, h, bias) for bias in (False, True) for c, h in WIDE_1X1_SHAPES]
    return out + [wide_network(3, c, h) for c, h in WIDE_3X3_SHAPES]


def wide_network_named(name: str) -> Network:
    """The wide-layer probe of that name (`wide_network`'s naming)."""
    match = _WIDE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a wide-layer probe: give e.g. wide3x3-1024x7 or wide1x1-256x28-bias"
        )
    kernel = 1 if match[1] == "1x1" else 3
    return wide_network(kernel, int(match[2]), int(match[3]), bias=match[4] is not None)


def network_of(spec: str) -> Network:
    """The IR network a spec names (see the module docstring)."""
    from lpnet.arch.from_torch import network_from_torchvision
    from lpnet.arch.generator import generate_network

    kind, _, value = spec.partition(":")
    if kind == "tv":
        return network_from_torchvision(value)
    if kind == "gen" and value.isdigit():
        return generate_network(int(value))
    if kind == "wide":
        return wide_network_named(value)
    if kind == "ir":
        return Network.from_json(Path(value).read_text())
    raise ValueError(
        f"unknown network {spec!r}: give tv:<torchvision name>, gen:<seed>, wide:<name> or ir:<file>"
    )
