"""Which generated networks to time in context: those whose layers the profile has timed least.

A predictor prices a layer by its rate kind (an operator, and a convolution by its kernel kind).
A kind timed in context fewer than a handful of times gets its rates from its class peers, and
those can be several times off: grouped convolutions priced like dense ones, squeeze-excitation
activations like ReLUs. A first-run profile times only a few generated networks in context, so the
order they come in decides which kinds are covered at all.

`coverage_ordered` therefore reorders the seeded stream: out of a window of the next candidates it
takes the network with the most layers of kinds still under `TARGET_ROWS` timed rows, counts its
layers, and repeats. The order depends only on the seeds and on the starting counts, so a resumed
run draws the same networks and its sample keys match.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from lpnet.arch.ir import Network
from lpnet.predictor.features import layer_rate_kind

# In-context rows per rate kind after which more of that kind add nothing to a candidate's gain
# (twice the rows the predictor needs before it fits a kind on its own).
TARGET_ROWS = 16
# Candidates compared for each network taken.
COVERAGE_WINDOW = 12


class KindCoverage:
    """Layers timed in context so far, per rate kind."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.counts: Counter[str] = Counter()
        for network in networks:
            self.add(network)

    def add(self, network: Network) -> None:
        self.counts.update(layer_rate_kind(layer) for layer in network.layers)

    def gain(self, network: Network) -> int:
        """How many of `network`'s layers are of kinds still under TARGET_ROWS, up to that target."""
        wanted = Counter(layer_rate_kind(layer) for layer in network.layers)
        return sum(min(n, max(0, TARGET_ROWS - self.counts[kind])) for kind, n in wanted.items())


def coverage_ordered(
    networks: Iterable[Network], coverage: KindCoverage, window: int = COVERAGE_WINDOW
) -> Iterator[Network]:
    """`networks` reordered so that each next one adds the most rows of thinly covered kinds.

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
