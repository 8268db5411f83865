"""Networks whose latencies follow a known work-over-throughput law, and quick fit settings: for
tests of what a fit does with its data, without timing."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.ir import Network
from lpnet.predictor.features import tensorize, work_terms
from lpnet.predictor.model import LPNet, LPNetConfig
from lpnet.predictor.samples import NetworkSample
from lpnet.predictor.train import TrainConfig

QUICK = TrainConfig(steps=30, batch_networks=8)
THREE = LPNetConfig(members=3, hidden=8)


def law_samples(count: int, family: str, seed: int = 0) -> list[NetworkSample]:
    """Two-convolution networks of varied widths, timed by a work-over-throughput law with 5 % noise;
    each its own architecture when `family` is the generator's."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        c_in, c_mid = (int(c) for c in rng.integers(4, 64, 2))
        module = nn.Sequential(nn.Conv2d(c_in, c_mid, 3, padding=1), nn.ReLU(), nn.Conv2d(c_mid, 8, 1))
        network = network_from_module(module, (1, c_in, 16, 16), name=f"{family}-{index}", family=family)
        tn = tensorize(network, with_groups=False)
        work = torch.exp(work_terms(tn.layer_features(torch.zeros(1, 0))[0]))  # (L, 2)
        per_layer = {
            name: float((3e-7 * w[0] + 1e-6 * w[1] + 0.005) * math.exp(rng.normal(0, 0.05)))
            for name, w in zip(tn.layer_names, work, strict=True)
        }
        samples.append(NetworkSample(network, sum(per_layer.values()), per_layer, family))
    return samples


def member_totals(model: LPNet, network: Network) -> torch.Tensor:
    """Every member's latency of one network, (K,)."""
    tn = tensorize(network, with_groups=False)
    with torch.no_grad():
        return model.member_network_ms(tn.layer_features(torch.zeros(1, 0)), tn.ops)[:, 0]
