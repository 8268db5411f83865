"""Training samples for latency predictors, independent of where they were stored."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lpnet.arch.generator import DEVELOPMENT_FAMILY, EVALUATION_FAMILY, PROFILING_FAMILY
from lpnet.arch.ir import Network
from lpnet.predictor.features import tensorize

GENERATED_FAMILIES = frozenset({PROFILING_FAMILY, EVALUATION_FAMILY, DEVELOPMENT_FAMILY})


@dataclass(frozen=True)
class NetworkSample:
    """One measured network: its IR, its median latency and, when measured, per-layer times."""

    network: Network
    latency_ms: float
    per_layer_ms: dict[str, float] | None = None
    family: str | None = None

    @property
    def group(self) -> str:
        """The architecture used to split by (leave-one-family-out): the family, or for a generated
        network its own name, since every generator seed is an architecture of its own."""
        family = self.family or self.network.family
        if family in GENERATED_FAMILIES and self.network.name:
            return self.network.name
        return family or self.network.name or "unknown"


@dataclass
class PackedSamples:
    """All layers of many networks as one table, with a segment index back to the network."""

    features: torch.Tensor  # (N, F) raw features
    ops: torch.Tensor  # (N,)
    segment: torch.Tensor  # (N,) network index of each layer
    layer_target_ms: torch.Tensor  # (N,) NaN where a layer was not timed
    network_target_ms: torch.Tensor  # (S,)
    num_networks: int

    def subset(self, networks: Sequence[int]) -> PackedSamples:
        """The packed rows of the listed networks, renumbered 0..len-1."""
        counts = torch.bincount(self.segment, minlength=self.num_networks)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        rows = [torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in networks]
        take = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        segment = torch.cat([torch.full((len(r),), j, dtype=torch.long) for j, r in enumerate(rows)])
        index = torch.as_tensor(list(networks), dtype=torch.long)
        return PackedSamples(
            features=self.features[take],
            ops=self.ops[take],
            segment=segment,
            layer_target_ms=self.layer_target_ms[take],
            network_target_ms=self.network_target_ms[index],
            num_networks=len(index),
        )


def pack_samples(samples: Sequence[NetworkSample]) -> PackedSamples:
    """Tensorise every sample (without channel groups: each is a fixed network)."""
    feats, ops, segs, layer_targets = [], [], [], []
    for s_index, sample in enumerate(samples):
        tn = tensorize(sample.network, with_groups=False)
        feats.append(tn.layer_features(torch.zeros(1, 0))[0])
        ops.append(tn.ops)
        segs.append(torch.full((tn.num_layers,), s_index, dtype=torch.long))
        per_layer = sample.per_layer_ms or {}
        layer_targets.append(
            torch.tensor([per_layer.get(name, float("nan")) for name in tn.layer_names], dtype=torch.float32)
        )
    return PackedSamples(
        features=torch.cat(feats),
        ops=torch.cat(ops),
        segment=torch.cat(segs),
        layer_target_ms=torch.cat(layer_targets),
        network_target_ms=torch.tensor([s.latency_ms for s in samples], dtype=torch.float32),
        num_networks=len(samples),
    )


def samples_fingerprint(samples: Sequence[NetworkSample]) -> str:
    """A stable hash of the training data: which networks, and what was measured."""
    rows = sorted(
        (s.network.content_hash, round(s.latency_ms, 6), sorted((s.per_layer_ms or {}).items()))
        for s in samples
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def merge_replicates(samples: Sequence[NetworkSample]) -> list[NetworkSample]:
    """One sample per architecture: repeated timings of one network become one median-labelled sample.

    A profile may time the same architecture more than once (re-timing rounds, a campaign that ran
    twice). As separate samples they would weigh that network more than the others, and a held-out
    split could put one timing in training and another in the test set, so the test would grade the
    predictor on a network it was fitted to. Latency is the median of the timings; each layer's
    time is the median of the timings that have it. Samples keep the order of first appearance,
    and the first family named.
    """
    groups: dict[str, list[NetworkSample]] = {}
    for sample in samples:
        groups.setdefault(sample.network.content_hash, []).append(sample)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        per_layer: dict[str, list[float]] = {}
        for sample in group:
            for name, ms in (sample.per_layer_ms or {}).items():
                per_layer.setdefault(name, []).append(ms)
        merged.append(
            NetworkSample(
                network=group[0].network,
                latency_ms=statistics.median(s.latency_ms for s in group),
                per_layer_ms={k: statistics.median(v) for k, v in per_layer.items()} or None,
                family=next((s.family for s in group if s.family), None),
            )
        )
    return merged
