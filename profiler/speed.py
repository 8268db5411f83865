"""A speed probe: one fixed small workload, timed around every sample of a network.

On a shared CPU the machine's own speed moves by tens of percent within minutes (other tenants,
frequency, caches), so a network's median in milliseconds says as much about the moment as about
the network. Timing a fixed probe right before and after every sample gives the machine's speed at
that moment; the median of the per-sample ratios (network / probe) is a latency in probe units that
repeats far better than the milliseconds do (bench/results/speed_probe.json).

The probe mixes the kernels CNNs spend their time in: a dense 3x3 convolution, a depthwise 3x3 and a
pointwise 1x1, at 28x28 with 64 channels, about a millisecond per forward on one core. Its weights
come from a fixed seed, so every process and every machine runs the same workload. `PROBE_VERSION`
changes whenever the workload does: ratios from different versions are not comparable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from torch import nn

from profiler.batch import Measurement

PROBE_VERSION = 1
_SEED = 20201130


class SpeedProbe:
    """Times the fixed probe workload on the CPU with the calling thread's torch settings."""

    def __init__(self, forwards: int = 2) -> None:
        if forwards < 1:
            raise ValueError(f"forwards must be at least 1, got {forwards}")
        self.forwards = forwards
        generator = torch.Generator().manual_seed(_SEED)
        self.module = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, groups=64),
            nn.Conv2d(64, 128, 1),
            nn.ReLU(),
        ).eval()
        with torch.no_grad():
            for parameter in self.module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        self.input = torch.randn(1, 64, 28, 28, generator=generator)

    def run(self) -> float:
        """Milliseconds per probe forward, over `forwards` back-to-back forwards."""
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(self.forwards):
                self.module(self.input)
            return (time.perf_counter() - start) * 1e3 / self.forwards

    def median_ms(self, runs: int = 31, warmup: int = 5) -> float:
        """The probe's median over `runs` runs after `warmup` untimed ones: the machine's speed now."""
        if runs < 1:
            raise ValueError(f"runs must be at least 1, got {runs}")
        for _ in range(warmup):
            self.run()
        return statistics.median(self.run() for _ in range(runs))


class ProbedRow(Protocol):
    """A stored or in-memory network row that may carry a speed probe (a `Measurement`, a database row)."""

    @property
    def probe_ms(self) -> float | None: ...

    @property
    def probe_version(self) -> int | None: ...


def nominal_probe_ms(rows: Iterable[ProbedRow]) -> float | None:
    """The probe's time at the device's typical speed: the median over the probed rows (None: none).

    Rows from another probe version are left out: their probe was another workload.
    """
    probes = [r.probe_ms for r in rows if r.probe_ms is not None and r.probe_version == PROBE_VERSION]
    return statistics.median(probes) if probes else None


# A run whose median probe is this much slower than its fastest tenth spent most of its time on a
# loaded machine (another job, a busy host): its latencies describe that load.
UNSTEADY_SLOWDOWN = 0.15
_MIN_STEADINESS_PROBES = 10


def typical_slowdown(probes: Sequence[float]) -> float | None:
    """How much slower than its quiet speed the machine typically ran: the median probe time over
    the fastest tenth's (its 10th percentile), minus one. None with fewer than 10 probes.

    On a quiet machine the probe's median is within a few per cent of its 10th percentile, whatever
    the occasional spike; when another load holds the CPU for minutes, most probes run slow and the
    median moves with them.
    """
    if len(probes) < _MIN_STEADINESS_PROBES:
        return None
    ordered = sorted(probes)
    quiet = ordered[int(0.1 * (len(ordered) - 1))]
    return statistics.median(ordered) / quiet - 1.0


# A run whose last third of probes ran this much faster or slower than its first third changed speed
# partway: rescaling by the probe takes out only part of such a change.
SPEED_SHIFT = 0.15


def speed_shift(probes: Sequence[float]) -> float | None:
    """How much the machine's speed moved during a run, from probe times in measurement order: the
    median of the last third over the median of the first third, minus one (negative: faster by the
    end). None with fewer than 30 probes.

    A probe ratio cancels a speed change only as far as every kernel slows or speeds up alike; when
    the machine's speed moved by a fifth partway through a profile, a predictor fitted on both parts
    was further off than one fitted on the first part alone (docs/benchmarks.md).
    """
    if len(probes) < 3 * _MIN_STEADINESS_PROBES:
        return None
    third = len(probes) // 3
    return statistics.median(probes[-third:]) / statistics.median(probes[:third]) - 1.0


def steadiness_warning(slowdown: float | None, shift: float | None = None) -> str | None:
    """A sentence for a run or a fit whose probes ran `slowdown` slower than quiet, past
    UNSTEADY_SLOWDOWN, or whose speed moved by `shift` partway (`speed_shift`), past SPEED_SHIFT."""
    sentences = []
    if slowdown is not None and slowdown > UNSTEADY_SLOWDOWN:
        sentences.append(
            f"the machine ran {slowdown:.0%} slower than its quiet speed for most of these measurements "
            "(another load on this CPU?): latencies fitted on them can be off by as much; measure again "
            "when the machine is quiet"
        )
    if shift is not None and abs(shift) > SPEED_SHIFT:
        direction = "slower" if shift > 0 else "faster"
        sentences.append(
            f"the machine ran {abs(shift):.0%} {direction} in the last third of these measurements than in "
            "the first: the speed probe takes out only part of such a change, and a predictor fitted "
            "across it describes neither speed; measure again while the machine holds one speed"
        )
    return "; ".join(sentences) or None


def at_nominal_speed(row: Measurement, nominal_ms: float) -> tuple[float, dict[str, float] | None]:
    """A probed row's network latency and per-layer split, as measured at the nominal probe speed.

    The network is its median ratio to the probe times the nominal probe; each layer is scaled by
    how much faster or slower the probe ran during this row than nominally.

    Raises:
        ValueError: the row has no probe, or one of another probe version.
    """
    if row.probe_ms is None or row.relative_latency is None or row.probe_version != PROBE_VERSION:
        raise ValueError(
            f"row {row.sample_key} has no speed probe of version {PROBE_VERSION} to normalise with"
        )
    per_layer = {t.layer: t.ms for t in row.per_layer} if row.per_layer else None
    return scale_to_nominal(row.relative_latency, row.probe_ms, per_layer, nominal_ms)


def scale_to_nominal(
    relative: float, probe_ms: float, per_layer_ms: dict[str, float] | None, nominal_ms: float
) -> tuple[float, dict[str, float] | None]:
    """`at_nominal_speed` on plain numbers: the network at `relative` x nominal, layers rescaled."""
    scale = nominal_ms / probe_ms
    layers = {name: ms * scale for name, ms in per_layer_ms.items()} if per_layer_ms is not None else None
    return relative * nominal_ms, layers
