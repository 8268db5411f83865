"""A device's training set: its measured networks as predictor samples, what their latencies mean,
and the device facts a fit needs (where layers' weights spill)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lpnet.arch.ir import Network
from lpnet.predictor.samples import NetworkSample, merge_replicates
from profiler.speed import PROBE_VERSION, nominal_probe_ms, scale_to_nominal, speed_shift, typical_slowdown
from service.db.models import Device, MeasurementStatus, NetworkMeasurement, ProfileRun


@dataclass(frozen=True)
class TrainingSet:
    """A device's training samples and what their latencies mean.

    `labels` is "ms" for the measured milliseconds, or "probe" when every network row was timed
    against the speed probe (profiler.speed): latencies are then at the device's nominal probe
    speed, `nominal_probe_ms`, which takes out how fast the machine happened to run at each moment.
    `timings` counts the measurement rows behind the samples (one sample per architecture);
    `typical_slowdown` how much slower than quiet the machine ran during them
    (`profiler.speed.typical_slowdown`; None without probes), and `speed_shift` how much its speed
    moved between the first and the last third of them in the order they were stored
    (`profiler.speed.speed_shift`); `last_level_cache_kb` and `fresh_mapping_kb` the device's
    last-level cache and the block size past which its C library maps allocations afresh
    (`device_spill_facts`), the smaller of which is where layers' weights spill.
    """

    samples: list[NetworkSample]
    labels: str
    nominal_probe_ms: float | None
    timings: int = 0
    typical_slowdown: float | None = None
    speed_shift: float | None = None
    last_level_cache_kb: int | None = None
    fresh_mapping_kb: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "nominal_probe_ms": self.nominal_probe_ms,
            "timings": self.timings,
            "typical_slowdown": self.typical_slowdown,
            "speed_shift": self.speed_shift,
            "last_level_cache_kb": self.last_level_cache_kb,
            "fresh_mapping_kb": self.fresh_mapping_kb,
        }


# A size outside this range (KiB) is not believed: the environment is client-supplied.
_PLAUSIBLE_KB = (64, 64 * 1024 * 1024)
# The environment fields (`profiler.environment.Environment`) that decide where weights spill.
SPILL_FACTS = ("last_level_cache_kb", "fresh_mapping_kb")


def device_spill_facts(session: Session, device_id: int) -> dict[str, int | None]:
    """Each of `SPILL_FACTS` (KiB) as the device's newest profile run that recorded it found it, else
    as its registration or agent recorded it; None where none did or the value is not plausible."""
    facts: dict[str, int | None] = {}
    recorded = session.scalars(
        select(ProfileRun.environment).where(ProfileRun.device_id == device_id).order_by(ProfileRun.id.desc())
    )
    for environment in itertools.chain(recorded, _registered_environment(session, device_id)):
        for key in SPILL_FACTS:
            value = (environment or {}).get(key)
            if key not in facts and isinstance(value, int) and not isinstance(value, bool):
                facts[key] = value if _PLAUSIBLE_KB[0] <= value <= _PLAUSIBLE_KB[1] else None
        if len(facts) == len(SPILL_FACTS):
            break
    return {key: facts.get(key) for key in SPILL_FACTS}


def _registered_environment(session: Session, device_id: int) -> Iterator[dict[str, Any] | None]:
    """The environment the device's registration or agent recorded, read only when asked for."""
    device = session.get(Device, device_id)
    yield device.environment if device is not None else None


def training_samples(session: Session, device_id: int) -> TrainingSet:
    """The device's successful network measurements as predictor training samples.

    Repeated timings of one architecture become one sample labelled with their median
    (`lpnet.predictor.samples.merge_replicates`), after scaling to the nominal probe speed.
    """
    rows = session.execute(
        select(
            NetworkMeasurement.architecture,
            NetworkMeasurement.median_ms,
            NetworkMeasurement.per_layer,
            NetworkMeasurement.family,
            NetworkMeasurement.probe_ms,
            NetworkMeasurement.relative_latency,
            NetworkMeasurement.probe_version,
        )
        .where(NetworkMeasurement.device_id == device_id, NetworkMeasurement.status == MeasurementStatus.OK)
        .order_by(NetworkMeasurement.id)
    ).all()
    probed = bool(rows) and all(
        row.probe_version == PROBE_VERSION and row.probe_ms and row.relative_latency for row in rows
    )
    nominal = nominal_probe_ms(rows) if probed else None
    samples = []
    for architecture, median_ms, per_layer, family, probe_ms, relative, _ in rows:
        per_layer_ms = {str(t["layer"]): float(t["ms"]) for t in per_layer} if per_layer else None
        latency = float(median_ms)
        if nominal is not None:
            latency, per_layer_ms = scale_to_nominal(float(relative), float(probe_ms), per_layer_ms, nominal)
        samples.append(
            NetworkSample(
                network=Network.model_validate(architecture),
                latency_ms=latency,
                per_layer_ms=per_layer_ms,
                family=family,
            )
        )
    probes = [float(row.probe_ms) for row in rows] if probed else []
    return TrainingSet(
        merge_replicates(samples),
        "probe" if probed else "ms",
        nominal,
        len(samples),
        typical_slowdown(probes),
        speed_shift(probes),
        **device_spill_facts(session, device_id),
    )
