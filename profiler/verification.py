"""Measuring plans for verification: whole networks, at a nominal machine speed when probed.

A plan is verified by timing the pruned network and comparing it with the budget. On a shared CPU
the machine's own speed drifts by tens of percent within minutes (bench/results/speed_probe.json),
so a raw median measured now and a budget derived from a median measured earlier can disagree by
more than the plan's margin. With a speed probe every sample is timed between two probe runs and
the network's latency is reported at a fixed, nominal probe time: the device profile's typical
speed, or the speed measured when a run started. The raw median is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lpnet.arch.ir import Network
from lpnet.measurement import MeasuredLatency
from profiler.backends.base import Backend
from profiler.measure import measure_network
from profiler.protocol import TimingProtocol, TimingResult
from profiler.speed import SpeedProbe


def measured_latency(result: TimingResult, nominal_probe_ms: float | None) -> MeasuredLatency:
    """A timing as a verification measurement: at `nominal_probe_ms` when it was probed, else raw."""
    return MeasuredLatency.at_speed(result.median_ms, result.relative, result.probe_ms, nominal_probe_ms)


@dataclass
class NetworkMeter:
    """Times whole networks on one backend; a `MeasureFn` for the planner's verification loop.

    With a `probe` (CPU backends only) results are at `nominal_probe_ms`; build one with `probed`.
    """

    backend: Backend
    protocol: TimingProtocol
    batch_size: int = 1
    probe: SpeedProbe | None = None
    nominal_probe_ms: float | None = None

    @classmethod
    def probed(
        cls,
        backend: Backend,
        protocol: TimingProtocol,
        batch_size: int = 1,
        nominal_probe_ms: float | None = None,
    ) -> NetworkMeter:
        """A meter that reports at `nominal_probe_ms`, or at the speed measured now when None.

        A backend that does not run on the CPU gets no probe (the probe times the CPU) and reports
        raw medians.
        """
        if not backend.runs_on_cpu:
            return cls(backend, protocol, batch_size)
        probe = SpeedProbe()
        nominal = nominal_probe_ms if nominal_probe_ms is not None else probe.median_ms()
        return cls(backend, protocol, batch_size, probe, nominal)

    def with_protocol(self, protocol: TimingProtocol) -> NetworkMeter:
        """The same backend, probe and nominal speed, timed under another protocol."""
        return replace(self, protocol=protocol)

    def timing(self, network: Network) -> TimingResult:
        """The full timing of one network (probed when this meter has a probe)."""
        probe = self.probe.run if self.probe is not None else None
        return measure_network(network, self.backend, self.protocol, self.batch_size, probe=probe)

    def __call__(self, network: Network) -> MeasuredLatency:
        return measured_latency(self.timing(network), self.nominal_probe_ms)
