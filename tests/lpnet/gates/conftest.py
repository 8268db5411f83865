"""Fixtures for the W-Gates tests: a tiny ResNet, real 1-thread measurements, a fitted LPNet.

The predictor is fitted once per test session on measured width variants of the tiny network and of
resnet18 at 64x64 (quick timing protocol, 1 thread: about 6 s of measuring and a few seconds of
fitting), so plans for both stay inside what it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lpnet.arch.from_torch import network_from_module, network_from_torchvision
from lpnet.arch.ir import Network
from lpnet.predictor.model import LPNetConfig
from lpnet.predictor.predict import LatencyPredictor
from lpnet.predictor.train import TrainConfig, fit_predictor
from profiler.backends.base import get_backend
from profiler.measure import measure_network
from profiler.protocol import TimingProtocol
from profiler.variants import measure_width_variants
from service.train.smallnet import SmallResNet, SmallResNetConfig

TINY_CONFIG = SmallResNetConfig(in_channels=3, num_classes=10, widths=(32, 64, 128))
TINY_INPUT = (1, 3, 32, 32)
RESNET18_INPUT = (1, 3, 64, 64)
TINY_VARIANTS = 16
RESNET18_VARIANTS = 8

Measure = Callable[[Network], float]


def tiny_module(seed: int = 0) -> SmallResNet:
    """The tiny ResNet with random weights and non-trivial BatchNorm statistics and affines."""
    torch.manual_seed(seed)
    module = SmallResNet(TINY_CONFIG).eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return module


@pytest.fixture(scope="session")
def tiny_net() -> Network:
    return network_from_module(tiny_module(), TINY_INPUT, name="tiny-resnet", family="tiny-resnet")


@pytest.fixture(scope="session")
def measure() -> Measure:
    """Median latency (ms) of a network, torch on the CPU, 1 thread, quick protocol."""
    backend = get_backend("torch-cpu", threads=1)
    # The quick protocol, capped tighter: on a loaded machine a 5 % median may take seconds to reach,
    # and the tests need a usable predictor, not a precise one.
    protocol = TimingProtocol.quick().model_copy(update={"max_seconds": 0.5})

    def run(network: Network) -> float:
        return measure_network(network, backend, protocol).median_ms

    return run


@pytest.fixture(scope="session")
def resnet18_small() -> Network:
    return network_from_torchvision("resnet18", RESNET18_INPUT)


@pytest.fixture(scope="session")
def tiny_predictor(tiny_net: Network, resnet18_small: Network, measure: Measure) -> LatencyPredictor:
    """LPNet fitted on measured variants of the tiny network and of resnet18 at 64x64."""
    samples = measure_width_variants(tiny_net, TINY_VARIANTS, measure, seed=0)
    samples += measure_width_variants(resnet18_small, RESNET18_VARIANTS, measure, seed=1)
    torch.manual_seed(0)
    return fit_predictor(samples, LPNetConfig(members=3), TrainConfig(steps=300))
