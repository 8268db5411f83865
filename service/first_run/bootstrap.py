"""The local device's first predictor: register this machine, profile it within a budget, fit LPNet.

`start_first_run` runs when a serving process starts (the app lifespan, before its workers): it
registers this machine's CPU as the local device if there is none, and makes sure exactly one
``bootstrap`` job is queued for it until it has a predictor. `run_bootstrap_job` is that job's task,
run by the server's embedded workers only (`service.job_handlers.serving_registry`), since it measures
the machine it runs on.

The job is resumable: every measurement is committed as it finishes, and a rerun skips the sample keys
already stored, with what is left of the time budget. A job whose server was killed is put back in the
queue by the next start; a failed one is followed by a new job at the next start. Progress (phase,
percent and ETA over the whole bootstrap, profiling then fitting) goes to the job, to the device's
status (``GET /v1/devices/{id}``, and the 409 answers for its latency), and every ~10 s to the log.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lpnet.errors import LpnetError
from profiler.environment import AllocatorPolicy
from service.config import FitSettings, Settings
from service.db.base import utcnow
from service.db.models import (
    Device,
    Job,
    JobStatus,
    LayerMeasurement,
    NetworkMeasurement,
    ProfileRun,
    RunStatus,
)
from service.db.session import describe_database_error
from service.devices import create_device, latest_predictor, local_device, set_device_status
from service.errors import Conflict, InvalidInput, NotFound, ServiceError
from service.first_run.progress import BootstrapProgress, format_duration
from service.jobs.context import JobContext, LeaseLost
from service.jobs.kinds import JobKind, job_timeout_seconds
from service.jobs.queue import ClaimedJob, TaskOutcome, active_job, enqueue
from service.predictors import (
    check_enough_measurements,
    fit_from_samples,
    min_fit_networks,
    ok_network_count,
    store_predictor,
    training_samples,
)
from service.profiling import DatabaseSink

if TYPE_CHECKING:
    from profiler.runner import RunSummary

logger = logging.getLogger(__name__)

# Fitting LPNet with 1 thread (see `estimated_fit_seconds`; only the ETA uses it): a fixed part (the
# held-out report and its plot) and a part per optimisation step of each ensemble member. Measured on
# the 2-core development machine under load: 58 networks, 1500 steps x 5 members, 94 s.
FIT_SECONDS_BASE = 5.0
FIT_SECONDS_PER_STEP_MEMBER = 0.01
# A resumed or retried bootstrap profiles for at least this share of the budget when the device has too
# few networks for a fit, so a run cut short near its end still gets somewhere.
MIN_PROFILE_SHARE = 0.25
# Rounds of measuring the networks a fit lacks after the budget (each stops at the number missing).
TOP_UP_ROUNDS = 3
# The default protocol times a network until its median is 1 % precise, for up to 30 s; on a quiet
# machine that takes 1-3 s, on a busy one every network would take the full 30 s and a 6-minute budget
# would measure a dozen. The first run caps it so that a busy machine still gets a predictor.
MAX_SECONDS_PER_MEASUREMENT = 6.0


class BootstrapInput(BaseModel):
    """The input of a bootstrap job, fixed when it is queued."""

    device_id: int
    budget_minutes: float = Field(gt=0)
    families: list[str] = Field(min_length=1)
    image_size: int = Field(ge=16)
    kinds: list[str] = Field(default_factory=lambda: ["network", "in_context"], min_length=1)
    quick_protocol: bool = False
    fit: FitSettings = Field(default_factory=FitSettings)


def bootstrap_input(settings: Settings, device_id: int) -> BootstrapInput:
    """The job input from the settings; the first-run fit settings override ``LPNET_FIT__*``."""
    first = settings.first_run
    fit = FitSettings(
        steps=first.fit.steps if first.fit.steps is not None else settings.fit.steps,
        members=first.fit.members if first.fit.members is not None else settings.fit.members,
    )
    return BootstrapInput(
        device_id=device_id,
        budget_minutes=first.budget_minutes,
        families=list(first.families),
        image_size=first.image_size,
        kinds=list(first.kinds),
        quick_protocol=first.quick_protocol,
        fit=fit,
    )


def estimated_fit_seconds(fit: FitSettings) -> float:
    """A rough duration of the fit, for the ETA."""
    # Imported here: the training module pulls in scikit-learn, which serving start-up does not need.
    from lpnet.predictor.model import LPNetConfig
    from lpnet.predictor.train import TrainConfig

    steps = fit.steps if fit.steps is not None else TrainConfig().steps
    members = fit.members if fit.members is not None else LPNetConfig().members
    return FIT_SECONDS_BASE + steps * members * FIT_SECONDS_PER_STEP_MEMBER


# Start-up ----------------------------------------------------------------------------------------------


def start_first_run(settings: Settings, factory: sessionmaker[Session]) -> int | None:
    """Register the local device if there is none, and make sure one bootstrap job is queued for it.

    Runs in the start-up of a serving process; never raises (the server serves either way), but logs
    why it did nothing.

    Returns:
        The id of the bootstrap job queued or resumed, or None when there is nothing to do.
    """
    if not settings.first_run.enabled:
        return None
    if not settings.worker.embedded:
        logger.info(
            "first run: not profiling this machine: the bootstrap runs in the server's own workers and "
            "LPNET_WORKER__EMBEDDED=false; use `lpnet device add`, `lpnet profile` and `lpnet fit` instead"
        )
        return None
    try:
        return _start(settings, factory)
    except SQLAlchemyError as exc:
        logger.warning("first run: skipped, the database failed: %s", describe_database_error(exc))
    except (ServiceError, LpnetError) as exc:
        logger.error("first run: skipped: %s", exc.message)
    except ValidationError as exc:
        logger.error("first run: skipped, this machine cannot be described as a device: %s", exc)
    return None


def _start(settings: Settings, factory: sessionmaker[Session]) -> int | None:
    with factory() as session:
        device = _local_device(session, settings)
        if device is None:
            return None
        predictor = latest_predictor(session, device)
        if predictor is not None:
            logger.info(
                "first run: device %r is ready (predictor version %d)", device.name, predictor.version
            )
            session.commit()
            return None
        job = active_job(session, JobKind.BOOTSTRAP, device.id)
        if job is None:
            fit = active_job(session, JobKind.FIT, device.id)
            if fit is not None:
                logger.info("first run: device %r has a fit %s (job %d)", device.name, fit.status, fit.id)
                session.commit()
                return None
            spec = bootstrap_input(settings, device.id)
            job_input = spec.model_dump(mode="json")
            job = enqueue(
                session,
                JobKind.BOOTSTRAP,
                job_input,
                device_id=device.id,
                max_attempts=settings.worker.max_attempts,
                timeout_seconds=job_timeout_seconds(JobKind.BOOTSTRAP, job_input, settings.worker),
            )
            device.status = _queued_status(job.id, spec, resumed=_has_measurements(session, device.id))
            logger.info(
                "first run: profiling this machine as device %r for %s, then fitting its predictor (job %d)",
                device.name,
                format_duration(spec.budget_minutes * 60),
                job.id,
            )
        elif job.status == JobStatus.RUNNING and lease_holder_gone(job.lease_owner):
            _requeue(session, job, settings)
            device.status = _queued_status(job.id, BootstrapInput.model_validate(job.input), resumed=True)
            logger.info(
                "first run: resuming job %d for device %r (the server running it stopped)",
                job.id,
                device.name,
            )
        else:
            logger.info("first run: job %d for device %r is %s", job.id, device.name, job.status)
        job_id = job.id
        session.commit()
    return job_id


def _local_device(session: Session, settings: Settings) -> Device | None:
    """The device to bootstrap: the first-run device, registered now if this machine has no local one."""
    name = settings.first_run.device_name
    device = session.scalars(select(Device).where(Device.name == name)).one_or_none()
    if device is not None:
        if not device.is_local:
            logger.warning(
                "first run: device %r is a remote device; set LPNET_FIRST_RUN__DEVICE_NAME to another name",
                name,
            )
            return None
        return device
    others = list(session.scalars(select(Device.name).where(Device.is_local.is_(True)).order_by(Device.id)))
    if others:
        logger.info(
            "first run: this machine is registered already (local device(s): %s); nothing to bootstrap",
            ", ".join(others),
        )
        return None
    logger.info("first run: registering this machine's CPU as device %r (torch-cpu, 1 thread)", name)
    try:
        # Freed memory kept by the process: faster on memory-heavy networks and far more repeatable
        # between processes, and the policy users are told to deploy with.
        return create_device(session, local_device(name, allocator=AllocatorPolicy.RETAIN))
    except Conflict:
        # Registered meanwhile by another process starting on the same database.
        return session.scalars(select(Device).where(Device.name == name)).one_or_none()


def _has_measurements(session: Session, device_id: int) -> bool:
    return session.scalar(select(ProfileRun.id).where(ProfileRun.device_id == device_id).limit(1)) is not None


def _queued_status(job_id: int, spec: BootstrapInput, *, resumed: bool) -> dict[str, Any]:
    what = "resuming with the measurements stored" if resumed else "queued"
    return {
        "phase": "profiling",
        "percent": 0.0,
        "eta_seconds": round(spec.budget_minutes * 60 + estimated_fit_seconds(spec.fit), 1),
        "message": f"first run: {what}; profiling, then fitting the first predictor",
        "job_id": job_id,
        "updated_at": utcnow().isoformat(),
    }


def lease_holder_gone(owner: str | None) -> bool:
    """Whether a lease belongs to a worker of a process on this machine that no longer runs.

    Owners look like ``host:pid:suffix`` (`service.jobs.worker.worker_id`). A lease of another
    machine, or of a process still alive, is left to lapse on its own.
    """
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not (pid_text.isascii() and pid_text.isdigit()):
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        # Called before this process's workers start: the holder was an earlier process with this pid
        # (a container restarts with the same one).
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _requeue(session: Session, job: Job, settings: Settings) -> None:
    """Put a job whose worker is gone back in the queue, with a new deadline (the caller commits).

    The deadline counts from now: the time the server was down is not the job's.
    """
    now = utcnow()
    timeout = job_timeout_seconds(JobKind.BOOTSTRAP, job.input, settings.worker)
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.lease_owner == job.lease_owner)
        .values(
            status=JobStatus.QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            error=f"the server running attempt {job.attempts} ({job.lease_owner}) stopped; resumed",
            deadline_at=now + timedelta(seconds=timeout),
            updated_at=now,
        )
    )


# The job -----------------------------------------------------------------------------------------------


def profiling_seconds(session: Session, device_id: int) -> float:
    """Measuring time the device's profile runs have spent: from each run's start to its last measurement."""
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
    total = 0.0
    for run_id, value in session.execute(
        select(ProfileRun.id, ProfileRun.started_at).where(ProfileRun.device_id == device_id)
    ):
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


def run_bootstrap_job(job: ClaimedJob, context: JobContext) -> TaskOutcome:
    """The bootstrap task: profile the local device with what is left of the budget, fit, store."""
    spec = BootstrapInput.model_validate(job.input)
    with context.factory() as session:
        device = session.get(Device, spec.device_id)
        if device is None:
            raise NotFound(
                f"device {spec.device_id} was deleted before its first run", {"device_id": spec.device_id}
            )
        if not device.is_local:
            raise InvalidInput(f"device {device.name!r} is remote; the first run profiles this machine only")
        session.expunge(device)
        spent = profiling_seconds(session, device.id)
        networks = ok_network_count(session, device.id)
    budget_s = spec.budget_minutes * 60
    profile_s = budget_s - spent
    if profile_s <= 0 and networks >= min_fit_networks():
        profile_s = 0.0
    else:
        profile_s = max(profile_s, MIN_PROFILE_SHARE * budget_s)
    tracker = BootstrapProgress(context, device.name, spent, profile_s, estimated_fit_seconds(spec.fit))
    summaries: list[RunSummary] = []
    if profile_s > 0:
        summaries.append(_profile(device, spec, context, tracker, spec.kinds, seconds=profile_s))
        summaries.extend(_top_up(device, spec, context, tracker))
    context.check()

    with context.factory() as session:
        stored = session.get(Device, device.id)
        if stored is None:
            raise NotFound(f"device {device.id} was deleted during its first run", {"device_id": device.id})
        check_enough_measurements(session, stored)
        samples = training_samples(session, device.id)
    tracker.fitting_started(len(samples.samples))
    fitted = fit_from_samples(samples, tracker.fitting, spec.fit)
    context.check()

    def store(session: Session) -> dict[str, Any]:
        predictor = store_predictor(session, device.id, fitted)
        logger.info(
            "first run: device %r is ready: predictor version %d fitted on %d networks in %s",
            device.name,
            predictor.version,
            fitted.samples,
            format_duration(fitted.seconds),
        )
        return {"predictor_id": predictor.id, "version": predictor.version}

    result = {
        "device_id": device.id,
        "device": device.name,
        "profiled_seconds": round(spent + sum(summary.seconds for summary in summaries), 1),
        "measured_this_run": sum(summary.measured for summary in summaries),
        "samples": fitted.samples,
        "fit_seconds": round(fitted.seconds, 2),
        "metrics": fitted.metrics,
        "training_fingerprint": fitted.fingerprint,
    }
    return TaskOutcome(result=result, store=store)


def _top_up(
    device: Device, spec: BootstrapInput, context: JobContext, tracker: BootstrapProgress
) -> list[RunSummary]:
    """Measure the networks a fit still lacks once the budget is spent (a slow or busy machine).

    A first run that ends without a predictor helps no one, so the budget gives way to the least a fit
    needs; a few rounds at most, in case measurements fail.
    """
    summaries = []
    for _ in range(TOP_UP_ROUNDS):
        with context.factory() as session:
            missing = min_fit_networks() - ok_network_count(session, device.id)
        if missing <= 0:
            break
        per_network = tracker.seconds_per_measurement()
        logger.info("first run: the budget measured too few networks for a fit; measuring %d more", missing)
        tracker.extend(missing * per_network)
        summary = _profile(device, spec, context, tracker, ["network"], max_samples=missing)
        summaries.append(summary)
        if summary.measured == 0:  # the families have no network samples left
            break
    return summaries


def _profile(
    device: Device,
    spec: BootstrapInput,
    context: JobContext,
    tracker: BootstrapProgress,
    kinds: list[str],
    *,
    seconds: float | None = None,
    max_samples: int | None = None,
) -> RunSummary:
    """Measure the device for `seconds` (or `max_samples`) into the database, skipping what is stored."""
    # Imported here: the profiler pulls in torch and torchvision, which start-up does not need.
    from profiler.agent.options import AgentOptions, build_sampler
    from profiler.batch import MeasurementKind
    from profiler.environment import apply_allocator_policy
    from profiler.runner import make_run_context, run_profile

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
        progress=False,
    )
    # The device's policy, which verified plans measure under too (service.plans.local_measure).
    apply_allocator_policy(options.allocator)
    device_spec = options.device()
    backend = device_spec.create_backend()
    sampler = build_sampler(options, device_spec)
    protocol = options.protocol()
    if protocol.max_seconds > MAX_SECONDS_PER_MEASUREMENT:
        protocol = protocol.model_copy(update={"max_seconds": MAX_SECONDS_PER_MEASUREMENT})
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
            on_measurement=tracker,
        )
        status = RunStatus.INTERRUPTED if summary.interrupted else RunStatus.COMPLETED
    except LeaseLost:
        status = RunStatus.INTERRUPTED
        raise
    finally:
        sink.close(status, summary.to_dict() if summary is not None else None)
    assert summary is not None  # run_profile returned, or the exception above propagated
    logger.info(
        "first run: profiled %r: %d measurement(s) in %s",
        device.name,
        summary.measured,
        format_duration(summary.seconds),
    )
    return summary


def bootstrap_failed(factory: sessionmaker[Session], job: ClaimedJob, error: str) -> None:
    """Show a failed bootstrap in the device's status; its measurements stay, the next start retries."""
    logger.error("first run failed: %s", error)
    if job.device_id is not None:
        set_device_status(
            factory,
            job.device_id,
            "failed",
            message=f"first run failed: {error}; the measurements are kept and the next `lpnet serve` retries",
            job_id=job.id,
        )
