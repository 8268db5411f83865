"""Tiny real networks and devices for the profiler tests (timings of a few milliseconds)."""

from __future__ import annotations

import pytest
from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.ir import Layer, Network, Op
from profiler.device import DeviceSpec
from profiler.protocol import TimingProtocol
from service.testing.tiny import TinyResNet

INPUT_SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="session")
def tiny_network() -> Network:
    return network_from_module(TinyResNet(), INPUT_SHAPE, name="tiny", family="tiny")


@pytest.fixture(scope="session")
def tiny_mobile_network() -> Network:
    """A depthwise-separable block, for a second family."""
    module = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU6(),
        nn.Conv2d(16, 24, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )
    return network_from_module(module, INPUT_SHAPE, name="tinymobile", family="tinymobile")


@pytest.fixture
def device() -> DeviceSpec:
    return DeviceSpec(hardware="test-cpu", backend="torch-cpu", threads=1)


@pytest.fixture
def fast_protocol() -> TimingProtocol:
    """Loose enough that a tiny network takes ~0.1 s."""
    return TimingProtocol(
        warmup_runs=2,
        warmup_ms=5,
        min_repeat_ms=20,
        min_repetitions=5,
        max_repetitions=100,
        target_precision=0.05,
        max_seconds=0.5,
    )


@pytest.fixture
def unsplittable_concat() -> Layer:
    """A concat whose five channels cannot be split over two inputs for isolated timing."""
    return Layer(
        name="cat",
        op=Op.CONCAT,
        inputs=["a", "b"],
        in_channels=5,
        out_channels=5,
        in_hw=(4, 4),
        out_hw=(4, 4),
    )
