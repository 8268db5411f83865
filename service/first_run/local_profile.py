"""Profiling this machine for the first run's jobs: what a job is given, one profile run, time spent.

`profile_local_device` measures the local device into the database within a time (or a count),
skipping the sample keys it already has and committing each measurement as it finishes; the bootstrap
and every round of refining profile through it. `profiling_seconds` is the measuring time the
device's runs have spent, which a resumed job subtracts from its budget.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from profiler.environment import DEFAULT_SECONDS_PER_PROCESS, AllocatorPolicy
from service.config import FitSettings
from service.db.models import Device, LayerMeasurement, NetworkMeasurement, ProfileRun, RunStatus
from service.first_run.progress import FirstRunProgress, format_duration
from service.jobs.context import JobContext, LeaseLost
from service.jobs.queue import Deferred
from service.profiling import DatabaseSink

if TYPE_CHECKING:
    from profiler.runner import RunSummary
    from profiler.sampling import Scorer

logger = logging.getLogger(__name__)

# Fitting LPNet with 1 thread (see `estimated_fit_seconds`; only the ETA uses it): a fixed part (the
# baselines fitted per fold for the report, and its plot) and a part per optimisation step of each
# ensemble member. Measured on
# the 2-core development machine under load: 58 networks, 1500 steps x 5 members, 94 s.
FIT_SECONDS_BASE = 5.0
FIT_SECONDS_PER_STEP_MEMBER = 0.01


class BootstrapInput(BaseModel):
    """The input of a bootstrap job, fixed when it is queued; its refining rounds inherit it."""

    device_id: int
    budget_minutes: float = Field(gt=0)
    families: list[str] = Field(min_length=1)
    image_size: int = Field(ge=16)
    kinds: list[str] = Field(default_factory=lambda: ["network", "in_context"], min_length=1)
    quick_protocol: bool = False
    seconds_per_process: float = Field(default=DEFAULT_SECONDS_PER_PROCESS, ge=0)
    fit: FitSettings = Field(default_factory=FitSettings)
    refine_minutes: float = Field(default=0.0, ge=0)
    refine_rounds: int = Field(default=1, ge=1)


def estimated_fit_seconds(fit: FitSettings) -> float:
    """A rough duration of the fit, for the ETA."""
    # Imported here: the training module pulls in scikit-learn, which serving start-up does not need.
    from lpnet.predictor.model import LPNetConfig
    from lpnet.predictor.train import TrainConfig

    steps = fit.steps if fit.steps is not None else TrainConfig().steps
    members = fit.members if fit.members is not None else LPNetConfig().members
    return FIT_SECONDS_BASE + steps * members * FIT_SECONDS_PER_STEP_MEMBER


def profiling_seconds(session: Session, device_id: int, since: datetime | None = None) -> float:
    """Measuring time the device's profile runs (those started at `since` or later) have spent: from
    each run's start to its last measurement."""
    ends: dict[int, datetime] = {}
    for model in (NetworkMeasurement, LayerMeasurement):
        rows = session.execute(
            select(model.run_id, func.max(model.created_at))
            .where(model.device_id == device_id, model.run_id.is_not(None))
            .group_by(model.run_id)
        )
        for run_id, value in rows:
            newest = _as_datetime(value)
            if newest is not None and (run_id not in ends or newest > ends[run_id]):
                ends[run_id] = newest
    runs = select(ProfileRun.id, ProfileRun.started_at).where(ProfileRun.device_id == device_id)
    if since is not None:
        runs = runs.where(ProfileRun.started_at >= since)
    total = 0.0
    for run_id, value in session.execute(runs):
        end = ends.get(run_id)
        started = _as_datetime(value)
        if end is not None and started is not None:
            total += max(0.0, (end - started).total_seconds())
    return total


def _as_datetime(value: Any) -> datetime | None:
    """A naive UTC datetime (SQLite returns aggregates of timestamps as text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def profile_local_device(
    device: Device,
    spec: BootstrapInput,
    context: JobContext,
    tracker: FirstRunProgress,
    kinds: list[str],
    *,
    seconds: float | None = None,
    max_samples: int | None = None,
    scorer: Scorer | None = None,
) -> RunSummary:
    """Measure the device for `seconds` (or `max_samples`) into the database, skipping what is stored.

    With a `scorer`, each sample is the one it rates highest of a pool of candidates (the sampler's
    adaptive mode, `profiler.sampling.Sampler.next_batch`).
    """
    # Imported here: the profiler pulls in torch and torchvision, which start-up does not need.
    from profiler.agent.options import AgentOptions, build_sampler
    from profiler.batch import MeasurementKind
    from profiler.environment import apply_allocator_policy
    from profiler.protocol import TimingProtocol
    from profiler.runner import make_run_context, run_profile
    from profiler.sampling import Sampler

    options = AgentOptions(
        families=list(spec.families),
        kinds=[MeasurementKind(kind) for kind in kinds],
        backend=device.backend,
        threads=device.threads,
        batch_size=device.batch_size,
        dtype=device.dtype,
        hardware=device.hardware,  # sample keys follow the registered spec exactly
        image_size=spec.image_size,
        budget_minutes=None if seconds is None else seconds / 60,
        quick_protocol=spec.quick_protocol,
        allocator=AllocatorPolicy(device.allocator),
        seconds_per_process=spec.seconds_per_process or None,
        progress=False,
    )
    # The device's policy, which verified plans measure under too (service.plans.local_measure).
    apply_allocator_policy(options.allocator)
    device_spec = options.device()
    backend = device_spec.create_backend()
    sampler: Sampler = build_sampler(options, device_spec)
    # The budgeted protocol, also when the run is bounded by a sample count instead of seconds.
    protocol = TimingProtocol.quick() if spec.quick_protocol else TimingProtocol.budgeted()
    sink = DatabaseSink(context.factory, device, make_run_context(device_spec, protocol, backend))
    tracker.start()
    summary: RunSummary | None = None
    status = RunStatus.FAILED
    try:
        summary = run_profile(
            device_spec,
            sampler,
            sink,
            protocol,
            budget_minutes=options.budget_minutes,
            progress=False,
            backend=backend,
            max_samples=max_samples,
            scorer=scorer,
            on_measurement=tracker,
            seconds_per_process=options.seconds_per_process,
        )
        status = RunStatus.INTERRUPTED if summary.interrupted else RunStatus.COMPLETED
    except (LeaseLost, Deferred):
        status = RunStatus.INTERRUPTED
        raise
    finally:
        sink.close(status, summary.to_dict() if summary is not None else None)
    assert summary is not None  # run_profile returned, or the exception above propagated
    _log_summary(tracker.stage, device.name, summary)
    return summary


def _log_summary(stage: str, device: str, summary: RunSummary) -> None:
    """What the run measured, and a warning when the machine ran slow for most of it or changed speed."""
    logger.info(
        "%s: profiled %r: %d measurement(s) in %s",
        stage,
        device,
        summary.measured,
        format_duration(summary.seconds),
    )
    unsteady = summary.unsteady_warning()
    if unsteady is not None:
        logger.warning("%s: %r: %s", stage, device, unsteady)
