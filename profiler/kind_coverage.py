"""Which generated networks to time in context: those whose layers the profile has timed least.

A predictor prices a layer by its rate kind (an operator, and a convolution by its kernel kind).
A kind timed in context fewer than a handful of times gets its rates from its class peers, and
those can be several times off: grouped convolutions priced like dense ones, squeeze-excitation
activations like ReLUs. Within a kind, the correction learns how kernel size, stride and a global
window move the price only from rows that have them: a first-run profile whose depthwise rows are
all 3x3, or whose grouped rows all have stride 1, prices 5x5 depthwise and strided grouped layers by
extrapolation. A first-run profile times only a few generated networks in context, so the order they
come in decides which of these are covered at all.

`coverage_ordered` therefore reorders the seeded stream: out of a window of the next candidates it
takes the network that adds most to the coverage of layer shapes (`layer_shape`: the rate kind, and
for a convolution its kernel size and whether it strides, for a pool whether its window is global),
counts its layers, and repeats. A shape's coverage is log(1 + its rows), counted up to `TARGET_ROWS`:
the first rows of a shape never timed are worth most, so one strided grouped convolution outweighs
a few more 3x3 ones. The order depends only on the seeds
and on the starting counts, so a resumed run draws the same networks and its sample keys match.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator

from lpnet.arch.ir import Layer, Network, Op
from lpnet.predictor.features import layer_rate_kind

# In-context rows per layer shape after which more of that shape add nothing to a candidate's gain
# (twice the rows the predictor needs before it fits a rate kind on its own).
TARGET_ROWS = 16
# Candidates compared for each network taken.
COVERAGE_WINDOW = 24
_POOLS = frozenset({Op.MAXPOOL2D, Op.AVGPOOL2D, Op.ADAPTIVE_AVGPOOL2D})


def layer_shape(layer: Layer) -> str:
    """What coverage counts a layer as: its rate kind; for a convolution also its kernel size (1, 3,
    5, 7 or more) and whether it strides; for a pool whether it reduces the map to one position."""
    kind = layer_rate_kind(layer)
    if layer.op is Op.CONV2D:
        size = min(max(layer.kernel), 7)
        return f"{kind}/k{size}/s{2 if max(layer.stride) > 1 else 1}"
    if layer.op in _POOLS:
        return f"{kind}/{'global' if layer.out_hw == (1, 1) else 'window'}"
    return kind


class KindCoverage:
    """Layers timed in context so far, per layer shape."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.counts: Counter[str] = Counter()
        for network in networks:
            self.add(network)

    def add(self, network: Network) -> None:
        self.counts.update(layer_shape(layer) for layer in network.layers)

    def gain(self, network: Network) -> float:
        """How much `network`'s layers add to the coverage: per shape, log(1 + rows) after adding them
        minus before, rows counted up to TARGET_ROWS."""
        wanted = Counter(layer_shape(layer) for layer in network.layers)
        return sum(
            math.log1p(min(self.counts[shape] + n, TARGET_ROWS))
            - math.log1p(min(self.counts[shape], TARGET_ROWS))
            for shape, n in wanted.items()
        )


def coverage_ordered(
    networks: Iterable[Network], coverage: KindCoverage, window: int = COVERAGE_WINDOW
) -> Iterator[Network]:
    """`networks` reordered so that each next one adds the most rows of thinly covered shapes.

    Ties (every candidate adds nothing, late in a long run) keep the stream's order.
    """
    source = iter(networks)
    pool: list[Network] = []
    while True:
        while len(pool) < window:
            candidate = next(source, None)
            if candidate is None:
                break
            pool.append(candidate)
        if not pool:
            return
        gains = [coverage.gain(network) for network in pool]
        best = max(range(len(pool)), key=lambda i: (gains[i], -i))
        chosen = pool.pop(best)
        coverage.add(chosen)
        yield chosen
