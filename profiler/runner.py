"""The profiling loop: pick a sample, measure it, hand it to the sink, repeat until done or out of time."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from profiler.backends.base import Backend
from profiler.batch import Measurement, MeasurementKind, RunContext
from profiler.budget import BudgetPlanner
from profiler.device import DeviceSpec
from profiler.environment import collect_environment, process_allocator_policy
from profiler.protocol import TimingProtocol
from profiler.recycling import ChildSetup, InProcessMeasurer, Measurer, RecycledMeasurer
from profiler.sampling import BucketKey, Sampler, Scorer
from profiler.sinks import MeasurementSink
from profiler.speed import SpeedProbe, speed_shift, steadiness_warning, typical_slowdown

logger = logging.getLogger(__name__)


@dataclass
class KindStats:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def per_minute(self) -> float:
        count = self.ok + self.failed
        return count / (self.seconds / 60.0) if self.seconds > 0 else 0.0


@dataclass
class Failure:
    sample_key: str
    kind: MeasurementKind
    family: str | None
    error: str


@dataclass
class RunSummary:
    """What a run did: counts per kind, failures, time, and whether it was cut short."""

    device: DeviceSpec
    per_kind: dict[MeasurementKind, KindStats] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    budget_minutes: float | None = None
    interrupted: bool = False
    probes_ms: list[float] = field(default_factory=list)

    @property
    def measured(self) -> int:
        return sum(s.ok + s.failed for s in self.per_kind.values())

    @property
    def minutes(self) -> float:
        return self.seconds / 60.0

    def add(self, measurement: Measurement, seconds: float) -> None:
        stats = self.per_kind.setdefault(measurement.kind, KindStats())
        stats.seconds += seconds
        if measurement.status == "ok":
            stats.ok += 1
            if measurement.probe_ms is not None:
                self.probes_ms.append(measurement.probe_ms)
        else:
            stats.failed += 1
            self.failures.append(
                Failure(measurement.sample_key, measurement.kind, measurement.family, measurement.error or "")
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "device": self.device.to_dict(),
            "per_kind": {
                kind.value: {"ok": s.ok, "failed": s.failed, "seconds": s.seconds, "per_minute": s.per_minute}
                for kind, s in self.per_kind.items()
            },
            "failures": [f.__dict__ | {"kind": f.kind.value} for f in self.failures],
            "skipped": self.skipped,
            "minutes": self.minutes,
            "budget_minutes": self.budget_minutes,
            "interrupted": self.interrupted,
            "probe_median_ms": statistics.median(self.probes_ms) if self.probes_ms else None,
            "typical_slowdown": typical_slowdown(self.probes_ms),
            "speed_shift": speed_shift(self.probes_ms),
        }

    def unsteady_warning(self) -> str | None:
        """The warning for a run that was slow for most of its time or changed speed partway
        (`profiler.speed.steadiness_warning`), or None."""
        return steadiness_warning(typical_slowdown(self.probes_ms), speed_shift(self.probes_ms))

    def format_table(self) -> str:
        """A plain-text table of the run, for a terminal."""
        lines = [f"{'kind':<12} {'ok':>6} {'failed':>7} {'minutes':>8} {'per min':>8}"]
        for kind, s in sorted(self.per_kind.items()):
            lines.append(
                f"{kind.value:<12} {s.ok:>6} {s.failed:>7} {s.seconds / 60:>8.2f} {s.per_minute:>8.1f}"
            )
        lines.append(
            f"{'total':<12} {sum(s.ok for s in self.per_kind.values()):>6} {len(self.failures):>7} "
            f"{self.minutes:>8.2f}"
        )
        notes = [f"skipped (already done): {self.skipped}"]
        if self.budget_minutes is not None:
            notes.append(f"budget: {self.budget_minutes:g} min")
        if self.interrupted:
            notes.append("INTERRUPTED: rerun the same command to resume")
        lines.append("; ".join(notes))
        slowdown = typical_slowdown(self.probes_ms)
        if slowdown is not None:
            median = statistics.median(self.probes_ms)
            lines.append(f"speed probe: median {median:.3f} ms, {slowdown:.0%} above its quiet tenth")
        warning = self.unsteady_warning()
        if warning is not None:
            lines.append(f"UNSTEADY: {warning}")
        for failure in self.failures[:10]:
            lines.append(
                f"  failed {failure.kind.value} {failure.family or '-'} {failure.sample_key}: {failure.error}"
            )
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more failures")
        return "\n".join(lines)

    def print_table(self, file: TextIO | None = None) -> None:
        """Print `format_table()` (the one place the profiler prints)."""
        print(self.format_table(), file=file)


def make_run_context(
    device: DeviceSpec, protocol: TimingProtocol, backend: Backend | None = None
) -> RunContext:
    """The context sinks store with measurements: device spec, fingerprint (with backend settings), protocol."""
    settings = backend.settings() if backend is not None else {}
    return RunContext(device=device, environment=collect_environment(settings), protocol=protocol)


def run_profile(
    device: DeviceSpec,
    sampler: Sampler,
    sink: MeasurementSink,
    protocol: TimingProtocol | None = None,
    budget_minutes: float | None = None,
    progress: bool = True,
    backend: Backend | None = None,
    max_samples: int | None = None,
    scorer: Scorer | None = None,
    on_measurement: Callable[[Measurement], None] | None = None,
    speed_probe: bool = True,
    seconds_per_process: float | None = None,
) -> RunSummary:
    """Measure samples until the sampler runs dry, the budget is spent or `max_samples` are done.

    Keys the sink already holds are skipped; each measurement is written to the sink as soon as it
    finishes, so Ctrl-C loses at most the one in flight. Ctrl-C is caught: the summary comes back
    with `interrupted=True` and the caller decides the exit code. The sink stays open.

    Args:
        device: what is measured; its backend is built here unless `backend` is given.
        sampler: where samples come from.
        sink: where measurements go.
        protocol: timing protocol (defaults to `TimingProtocol()`).
        budget_minutes: wall-time budget shared over (family, kind) buckets; None = until dry.
        progress: show a tqdm bar with ETA.
        backend: a ready backend; must match `device.backend`.
        max_samples: stop after this many measurements.
        scorer: adaptive mode hook, passed to `sampler.next_batch`.
        on_measurement: called with every measurement after the sink has it.
        speed_probe: time the speed probe (profiler.speed) around every sample of a network, so
            rows also carry the latency relative to the machine's speed; CPU backends only.
        seconds_per_process: measure in child processes replaced after this many seconds
            (profiler.recycling); None measures here with `backend`.
    """
    protocol = protocol or TimingProtocol()
    backend = backend or device.create_backend()
    if backend.name != device.backend:
        raise ValueError(f"backend {backend.name!r} does not match the device spec's {device.backend!r}")
    _warn_if_busy(backend.threads)
    measurer = _measurer(device, backend, speed_probe, seconds_per_process)
    planner = BudgetPlanner.from_minutes(_measurable_buckets(sampler, backend), budget_minutes)
    summary = RunSummary(device=device, budget_minutes=budget_minutes)
    done = set(sink.done_keys())
    started = time.perf_counter()
    bar = tqdm(
        total=_estimated_total(sampler, planner, summary),
        disable=not progress,
        unit="sample",
        dynamic_ncols=True,
    )
    try:
        while max_samples is None or summary.measured < max_samples:
            bucket = planner.next_bucket()
            if bucket is None:
                break
            batch = sampler.next_batch(done, size=1, bucket=bucket, scorer=scorer)
            if not batch:
                planner.exhaust(bucket)
                continue
            bar.set_postfix_str(f"{batch[0].kind.value} {batch[0].family or ''}", refresh=False)
            t0 = time.perf_counter()
            measurement = measurer(batch[0], protocol)
            sink.write(measurement)
            done.add(measurement.sample_key)
            planner.record(bucket, seconds := time.perf_counter() - t0)
            summary.add(measurement, seconds)
            if on_measurement is not None:
                on_measurement(measurement)
            _advance(bar, sampler, planner, summary)
    except KeyboardInterrupt:
        summary.interrupted = True
        logger.warning("interrupted after %d measurement(s); rerun to resume", summary.measured)
    finally:
        measurer.close()
        bar.close()
        summary.skipped = sampler.skipped
        summary.seconds = time.perf_counter() - started
    return summary


def _measurer(
    device: DeviceSpec, backend: Backend, speed_probe: bool, seconds_per_process: float | None
) -> Measurer:
    """Where samples are measured: here with `backend`, or in recycled child processes."""
    with_probe = speed_probe and backend.runs_on_cpu
    if seconds_per_process is None:
        return InProcessMeasurer(backend, device.batch_size, SpeedProbe().run if with_probe else None)
    setup = ChildSetup(device=device, allocator=process_allocator_policy(), speed_probe=with_probe)
    return RecycledMeasurer(setup, seconds_per_process)


def _advance(bar: tqdm[Any], sampler: Sampler, planner: BudgetPlanner, summary: RunSummary) -> None:
    """Count a finished sample in the summary and the progress bar, re-estimating the bar's total."""
    summary.skipped = sampler.skipped
    total = _estimated_total(sampler, planner, summary)
    if total is not None:
        bar.total = max(total, summary.measured)
    bar.update(1)


def _measurable_buckets(sampler: Sampler, backend: Backend) -> list[BucketKey]:
    """The sampler's buckets the backend can measure (in-context layers need layer-wise timing)."""
    buckets = sampler.buckets()
    if backend.supports_layerwise:
        return buckets
    dropped = [b for b in buckets if b[1] is MeasurementKind.IN_CONTEXT]
    if dropped:
        logger.warning(
            "backend %s cannot time layers in context; skipping %d in_context bucket(s)",
            backend.name,
            len(dropped),
        )
    return [b for b in buckets if b[1] is not MeasurementKind.IN_CONTEXT]


def _warn_if_busy(threads: int) -> None:
    """Other work on the cores skews every timing; say so before spending the budget."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    idle = (os.cpu_count() or 1) - threads
    if load > idle + 0.5:
        logger.warning(
            "load average %.1f on %d cores while measuring with %d thread(s): other processes compete "
            "for the CPU and timings will be slower and noisier",
            load,
            os.cpu_count() or 1,
            threads,
        )


def _estimated_total(sampler: Sampler, planner: BudgetPlanner, summary: RunSummary) -> int | None:
    """Samples this run is expected to measure in all: the budget's estimate, else the sampler's plan."""
    by_budget = planner.estimated_remaining_samples()
    planned = sampler.planned_total(planner.buckets)
    by_plan = None if planned is None else max(0, planned - sampler.skipped - summary.measured)
    candidates = [n for n in (by_budget, by_plan) if n is not None]
    if not candidates:
        return None
    return summary.measured + min(candidates)
