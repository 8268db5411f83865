"""Baseline predictors fitted on the same data as LPNet (scikit-learn).

- `LayerForestSum`: nn-Meter's method: a RandomForest per layer, summed over the network.
- `FlopsLinear`: a linear model of network latency on FLOPs and parameters.
- `LayerLookupSum`: a lookup table of measured layer timings, summed; a layer missing from the
  table takes its nearest measured neighbour (in feature space) and is counted as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LinearRegression
from sklearn.neighbors import KNeighborsRegressor

from lpnet.arch.counting import network_cost
from lpnet.arch.ir import Layer, Network
from lpnet.predictor.features import OPS
from lpnet.predictor.samples import NetworkSample, pack_samples


class NetworkLatencyModel(Protocol):
    name: str

    def fit(self, samples: Sequence[NetworkSample]) -> None: ...

    def predict(self, networks: Sequence[Network]) -> np.ndarray: ...


def _layer_table(samples: Sequence[NetworkSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-layer rows (features with one-hot op), targets and network index, for timed layers only."""
    packed = pack_samples(samples)
    one_hot = np.eye(len(OPS))[packed.ops.numpy()]
    x = np.concatenate([packed.features.numpy(), one_hot], axis=1)
    y = packed.layer_target_ms.numpy()
    return x, y, packed.segment.numpy()


def _network_layer_rows(networks: Sequence[Network]) -> tuple[np.ndarray, np.ndarray]:
    samples = [NetworkSample(network=n, latency_ms=1.0) for n in networks]
    x, _, segment = _layer_table(samples)
    return x, segment


class LayerForestSum:
    """nn-Meter style: per-layer RandomForest regressors on layer features, summed."""

    name = "nn-Meter-style RF sum"

    def __init__(self, seed: int = 0) -> None:
        self.forest = RandomForestRegressor(
            n_estimators=100, min_samples_leaf=2, max_samples=0.5, n_jobs=1, random_state=seed
        )

    def fit(self, samples: Sequence[NetworkSample]) -> None:
        x, y, _ = _layer_table(samples)
        timed = ~np.isnan(y)
        if not timed.any():
            raise ValueError("the RF baseline needs per-layer timings")
        self.forest.fit(x[timed], np.log(np.clip(y[timed], 1e-4, None)))

    def predict(self, networks: Sequence[Network]) -> np.ndarray:
        x, segment = _network_layer_rows(networks)
        per_layer = np.exp(self.forest.predict(x))
        return np.bincount(segment, weights=per_layer, minlength=len(networks))


class FlopsLinear:
    """Network latency as a linear function of FLOPs and parameters."""

    name = "FLOPs+params linear"

    def __init__(self) -> None:
        self.model = LinearRegression()

    @staticmethod
    def _x(networks: Sequence[Network]) -> np.ndarray:
        costs = [network_cost(n) for n in networks]
        return np.array([[c.flops / 1e9, c.params / 1e6] for c in costs])

    def fit(self, samples: Sequence[NetworkSample]) -> None:
        self.model.fit(self._x([s.network for s in samples]), np.array([s.latency_ms for s in samples]))

    def predict(self, networks: Sequence[Network]) -> np.ndarray:
        # A linear fit can go negative for tiny networks; a latency cannot.
        return np.clip(self.model.predict(self._x(networks)), 1e-3, None)


def layer_key(layer: Layer) -> str:
    """A layer's configuration without its name and wiring: the lookup-table key."""
    return layer.model_dump_json(exclude={"name", "inputs"})


class LayerLookupSum:
    """Sum of looked-up layer timings (median per configuration); misses take the nearest neighbour."""

    name = "layer lookup-table sum"

    def __init__(self) -> None:
        self.table: dict[str, float] = {}
        self.neighbours = KNeighborsRegressor(n_neighbors=1)
        self.misses = 0
        self.lookups = 0

    def fit(self, samples: Sequence[NetworkSample], isolated: Sequence[tuple[Layer, float]] = ()) -> None:
        timings: dict[str, list[float]] = {}
        for layer, ms in isolated:
            timings.setdefault(layer_key(layer), []).append(ms)
        for sample in samples:
            for layer in sample.network.layers:
                if sample.per_layer_ms and layer.name in sample.per_layer_ms:
                    timings.setdefault(layer_key(layer), []).append(sample.per_layer_ms[layer.name])
        if not timings:
            raise ValueError("the lookup-table baseline needs layer timings")
        self.table = {k: float(np.median(v)) for k, v in timings.items()}
        x, y, _ = _layer_table(samples)
        timed = ~np.isnan(y)
        self.neighbours.fit(x[timed], y[timed])

    def predict(self, networks: Sequence[Network]) -> np.ndarray:
        x, segment = _network_layer_rows(networks)
        fallback = self.neighbours.predict(x)
        values = []
        row = 0
        for network in networks:
            for layer in network.layers:
                self.lookups += 1
                hit = self.table.get(layer_key(layer))
                if hit is None:
                    self.misses += 1
                    hit = float(fallback[row])
                values.append(hit)
                row += 1
        return np.bincount(segment, weights=np.array(values), minlength=len(networks))
