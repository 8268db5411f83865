"""Width variants of one network, measured: the training data of a predictor dedicated to it.

A device's predictor is fitted on torchvision families at their usual input size. A network far
from those (a small digits ResNet at 16x16, say) is outside its training domain; measuring a few
dozen width variants of that very network here and fitting on them gives a predictor that covers it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.arch.ir import Network
from lpnet.gates.budget import width_grid
from lpnet.predictor.samples import NetworkSample

MeasureFn = Callable[[Network], float]
"""Measures a network, returning its median latency in ms."""
ProgressFn = Callable[[int, int], None]
"""Called with (variants measured, variants planned)."""


def width_variants(network: Network, count: int, seed: int = 0) -> list[list[int]]:
    """The full width vector, the smallest one, then random ones from heavily pruned to whole.

    The smallest vector (the planner's default grid minimum) is there because a planner always asks
    for it, the fastest reachable plan deciding whether a budget is feasible: a predictor must not
    extrapolate there.

    Odd variants scale every group by one common share (+-30 % per group); even ones draw each
    group's share independently, because planners visit unbalanced width vectors too. Every width is
    the nearest on the planner's default grid (`width_grid`: multiples of lcm(8, the group's
    divisor) from its minimum, or the group's full width): the widths a plan asks about.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    layout = channel_layout(network)
    rng = random.Random(seed)
    grid = width_grid(layout)
    vectors = [list(layout.full_widths)]
    if count > 1:
        vectors.append(list(grid.min_widths))
    for index in range(2, count):
        share = rng.uniform(0.15, 1.0)
        shares = [
            share * rng.uniform(0.7, 1.3) if index % 2 else rng.uniform(0.1, 1.0) for _ in layout.groups
        ]
        vectors.append(grid.nearest([s * g.channels for s, g in zip(shares, layout.groups, strict=True)]))
    return vectors


def measure_width_variants(
    network: Network,
    count: int,
    measure: MeasureFn,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[NetworkSample]:
    """Measure `width_variants(network, count, seed)` with `measure`, as predictor training samples."""
    samples = []
    vectors = width_variants(network, count, seed)
    family = network.family or network.name
    for index, widths in enumerate(vectors):
        pruned = apply_width_vector(network, widths)
        samples.append(NetworkSample(pruned, measure(pruned), family=family))
        if progress is not None:
            progress(index + 1, len(vectors))
    return samples
