"""What measuring a network on a device gives the library: a latency, raw and at nominal speed.

The planner's verification and train mode take a `MeasureFn`; the profiler and the service provide
them (profiler.verification times networks on a backend, the service on remote devices too).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lpnet.arch.ir import Network


@dataclass(frozen=True)
class MeasuredLatency:
    """One verification measurement of a network.

    Attributes:
        ms: the latency judged against the budget. With a speed probe it is the latency at the
            nominal speed (the median network/probe ratio times `nominal_probe_ms`), which takes out
            how fast a shared machine happened to run at that moment; without one, the raw median.
        raw_ms: the median as timed, in milliseconds of that moment.
        probe_ms: the speed probe's median during the measurement (None: not probed).
        nominal_probe_ms: the probe time `ms` is scaled to (None: not probed).
    """

    ms: float
    raw_ms: float
    probe_ms: float | None = None
    nominal_probe_ms: float | None = None

    @classmethod
    def of(cls, value: float | MeasuredLatency) -> MeasuredLatency:
        """A measurement from what a measure callable returned (a plain float is a raw median)."""
        return value if isinstance(value, MeasuredLatency) else cls(float(value), float(value))

    @classmethod
    def at_speed(
        cls,
        raw_ms: float,
        relative: float | None,
        probe_ms: float | None,
        nominal_probe_ms: float | None,
    ) -> MeasuredLatency:
        """A timing judged at `nominal_probe_ms` when it was probed (`relative` = median
        network/probe ratio); the raw median when it was not, or when there is no nominal speed."""
        if relative is None or probe_ms is None:
            return cls(raw_ms, raw_ms)
        if nominal_probe_ms is None:
            return cls(raw_ms, raw_ms, probe_ms)
        return cls(relative * nominal_probe_ms, raw_ms, probe_ms, nominal_probe_ms)

    @classmethod
    def median(cls, timings: Sequence[MeasuredLatency]) -> MeasuredLatency:
        """One figure from repeated timings of the same network: the median of each field."""
        if not timings:
            raise ValueError("no timings to combine")
        probes = [t.probe_ms for t in timings if t.probe_ms is not None]
        nominal = timings[0].nominal_probe_ms
        return cls(
            ms=statistics.median(t.ms for t in timings),
            raw_ms=statistics.median(t.raw_ms for t in timings),
            probe_ms=statistics.median(probes) if len(probes) == len(timings) else None,
            nominal_probe_ms=nominal if probes else None,
        )


MeasureFn = Callable[[Network], float | MeasuredLatency]
"""Measures a (pruned) network: its median in ms, or a `MeasuredLatency` when speed-probed."""
