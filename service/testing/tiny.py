"""A tiny real network (timings of a few milliseconds), its real measurements and a predictor fitted on them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.ir import Network
from profiler.batch import Measurement, MeasurementKind, ProfileBatch, RunContext
from profiler.device import DeviceSpec
from profiler.environment import AllocatorPolicy, apply_allocator_policy
from profiler.protocol import TimingProtocol
from service.predictors import FittedPredictor

TINY_INPUT_SHAPE = (1, 3, 32, 32)
# The spec every tiny measurement was taken with, under the allocator policy retain; a device registered
# with them accepts them.
TINY_SPEC = DeviceSpec(hardware="test-cpu", backend="torch-cpu", threads=1, batch_size=1, dtype="float32")


class TinyResNet(nn.Module):
    """conv-bn-relu stem, one residual block, pooling and a classifier: every kind of coupling."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, W, 32, 32)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        x = torch.relu(self.down(x))  # (N, 2W, 16, 16)
        return self.fc(torch.flatten(self.pool(x), 1))  # (N, classes)


def tiny_module() -> TinyResNet:
    """The tiny residual net the service tests and the reliability bench measure, prune and upload."""
    return TinyResNet(width=32)


def tiny_network() -> Network:
    return network_from_module(tiny_module(), TINY_INPUT_SHAPE, name="tiny", family="tiny")


@dataclass(frozen=True)
class TinyProfile:
    """Real measurements of width variants of the tiny network, and a predictor fitted on them."""

    network: Network
    context: RunContext
    measurements: list[Measurement]
    fitted: FittedPredictor

    @property
    def network_measurements(self) -> list[Measurement]:
        return [m for m in self.measurements if m.kind is not MeasurementKind.ISOLATED]

    @property
    def one_per_architecture(self) -> list[Measurement]:
        """Whole-network rows with each architecture once: the in-context timing where there is one.

        A fit merges repeated timings of one architecture into one sample, so with these rows
        sample i is row i.
        """
        last = {m.architecture.content_hash: m for m in self.network_measurements if m.architecture}
        return [
            m for m in self.network_measurements if m.architecture and last[m.architecture.content_hash] is m
        ]

    def batch(self, key: str, measurements: list[Measurement] | None = None) -> ProfileBatch:
        return ProfileBatch.build(
            key, self.context, list(self.measurements if measurements is None else measurements)
        )

    def batch_json(self, key: str, measurements: list[Measurement] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.batch(key, measurements).model_dump_json())
        return data


def measure_tiny_profile() -> TinyProfile:
    """Time ~34 width variants (4 with per-layer times) and 4 isolated layers under retain, then fit (~10 s)."""
    from lpnet.predictor.samples import NetworkSample
    from profiler.runner import make_run_context, run_profile
    from profiler.sampling import SamplingConfig, StratifiedSampler
    from profiler.sinks import MemorySink
    from service.config import FitSettings
    from service.predictors import fit_from_samples

    torch.set_num_threads(1)
    apply_allocator_policy(AllocatorPolicy.RETAIN)
    network = tiny_network()
    # Every width (channel_step 1): the tiny network's groups have only a few multiples of 8.
    config = SamplingConfig(
        network_samples=34,
        in_context_samples=4,
        isolated_samples=4,
        lhs_block=8,
        min_ratio=0.2,
        channel_step=1,
    )
    sampler = StratifiedSampler({"tiny": network}, TINY_SPEC, config)
    sink = MemorySink()
    protocol = TimingProtocol.quick()
    backend = TINY_SPEC.create_backend()
    run_profile(TINY_SPEC, sampler, sink, protocol, progress=False, backend=backend)
    context = make_run_context(TINY_SPEC, protocol, backend)
    samples = [
        NetworkSample(
            network=m.architecture,
            latency_ms=float(m.median_ms),
            per_layer_ms={t.layer: t.ms for t in m.per_layer} if m.per_layer else None,
            family=m.family,
        )
        for m in sink.measurements
        if m.status == "ok" and m.architecture is not None and m.median_ms is not None
    ]
    fitted = fit_from_samples(samples, settings=FitSettings(steps=200, members=3))
    return TinyProfile(network, context, list(sink.measurements), fitted)
