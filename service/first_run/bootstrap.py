"""The local device's first predictor: register this machine, profile it within a budget, fit LPNet.

`start_first_run` runs when a serving process starts (the app lifespan, before its workers): it
registers this machine's CPU as the local device if there is none, and makes sure exactly one
``bootstrap`` job is queued for it until it has a predictor, then one ``refine`` job at a time until
its refining is done (`service.first_run.refine`). `run_bootstrap_job` is the bootstrap's task, run by
the server's embedded workers only (`service.job_handlers.serving_registry`), since it measures the
machine it runs on; storing predictor version 1, it queues the first refining round.

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
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lpnet.errors import LpnetError
from profiler.environment import AllocatorPolicy
from service.config import FitSettings, Settings, get_settings
from service.db.base import utcnow
from service.db.models import Device, Job, JobStatus, Predictor, ProfileRun
from service.db.session import describe_database_error
from service.devices import create_device, latest_predictor, local_device, set_device_status
from service.errors import Conflict, InvalidInput, NotFound, ServiceError
from service.first_run.local_profile import (
    BootstrapInput,
    estimated_fit_seconds,
    profile_local_device,
    profiling_seconds,
)
from service.first_run.progress import FirstRunProgress, format_duration
from service.first_run.refine import (
    RefineInput,
    next_refine_round,
    queue_refine,
    queued_refine_status,
    refine_input,
)
from service.jobs.context import JobContext
from service.jobs.kinds import JobKind, job_timeout_seconds
from service.jobs.queue import JOBS, ClaimedJob, TaskOutcome, active_job, enqueue, failure_values
from service.predictors import (
    check_enough_measurements,
    fit_from_samples,
    min_fit_networks,
    ok_network_count,
    store_predictor,
)
from service.training_set import training_samples

if TYPE_CHECKING:
    from profiler.runner import RunSummary

logger = logging.getLogger(__name__)

# A resumed or retried bootstrap profiles for at least this share of the budget when the device has too
# few networks for a fit, so a run cut short near its end still gets somewhere.
MIN_PROFILE_SHARE = 0.25
# Rounds of measuring the networks a fit lacks after the budget (each stops at the number missing).
TOP_UP_ROUNDS = 3


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
        seconds_per_process=first.seconds_per_process,
        fit=fit,
        refine_minutes=first.refine_minutes,
        refine_rounds=first.refine_rounds,
    )


# Start-up ----------------------------------------------------------------------------------------------


def start_first_run(settings: Settings, factory: sessionmaker[Session]) -> int | None:
    """Register the local device if there is none, and make sure one bootstrap job is queued for it,
    or once it has a predictor one refine job until its refining is done.

    Runs in the start-up of a serving process; never raises (the server serves either way), but logs
    why it did nothing.

    Returns:
        The id of the bootstrap or refine job queued or resumed, or None when there is nothing to do.
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
        # A bootstrap still unfinished (a predictor came from elsewhere) queues the refining itself.
        if predictor is None or active_job(session, JobKind.BOOTSTRAP, device.id) is not None:
            job = _start_bootstrap(session, settings, device)
        else:
            job = _start_refining(session, settings, device, predictor)
        job_id = job.id if job is not None else None
        session.commit()
    return job_id


def _start_bootstrap(session: Session, settings: Settings, device: Device) -> Job | None:
    """The bootstrap job of a device without a predictor: queued, resumed, or left as it is."""
    job = active_job(session, JobKind.BOOTSTRAP, device.id)
    if job is None:
        fit = active_job(session, JobKind.FIT, device.id)
        if fit is not None:
            logger.info("first run: device %r has a fit %s (job %d)", device.name, fit.status, fit.id)
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
            "first run: resuming job %d for device %r (the server running it stopped)", job.id, device.name
        )
    else:
        logger.info("first run: job %d for device %r is %s", job.id, device.name, job.status)
    return job


def _start_refining(session: Session, settings: Settings, device: Device, predictor: Predictor) -> Job | None:
    """The refining of a device with a predictor: queued, resumed, stopped (turned off) or done."""
    first = settings.first_run
    job = active_job(session, JobKind.REFINE, device.id)
    if first.refine_minutes <= 0:
        if job is not None:
            _stop_refining(session, device, job)
        logger.info("first run: device %r is ready (predictor version %d)", device.name, predictor.version)
        return None
    if job is None:
        round_ = next_refine_round(session, device.id, first.refine_rounds)
        if round_ is None:
            logger.info(
                "first run: device %r is ready and refined (predictor version %d)",
                device.name,
                predictor.version,
            )
            return None
        spec = refine_input(bootstrap_input(settings, device.id), round_)
        job = queue_refine(session, spec, settings.worker, resumed=round_ > 1)
        logger.info(
            "first run: device %r is ready (predictor version %d); %s in the background (job %d)",
            device.name,
            predictor.version,
            spec.stage,
            job.id,
        )
    elif job.status == JobStatus.RUNNING and lease_holder_gone(job.lease_owner):
        _requeue(session, job, settings)
        device.status = queued_refine_status(job.id, RefineInput.model_validate(job.input), resumed=True)
        logger.info(
            "first run: resuming refine job %d for device %r (the server running it stopped); predictor "
            "version %d serves meanwhile",
            job.id,
            device.name,
            predictor.version,
        )
    else:
        logger.info("first run: refine job %d for device %r is %s", job.id, device.name, job.status)
    return job


def _stop_refining(session: Session, device: Device, job: Job) -> None:
    """Fail a refine job that no live worker holds, since refining is turned off (the caller commits)."""
    if job.status == JobStatus.RUNNING and not lease_holder_gone(job.lease_owner):
        logger.info("first run: refine job %d is running elsewhere; it finishes its round", job.id)
        return
    message = "refining was turned off (LPNET_FIRST_RUN__REFINE_MINUTES=0)"
    session.execute(
        update(Job).where(Job.id == job.id).values(**failure_values(JOBS, message, utcnow(), requeue=False))
    )
    device.status = None
    logger.info("first run: %s; refine job %d stopped", message, job.id)


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
    timeout = job_timeout_seconds(job.kind, job.input, settings.worker)
    # A job deferred while it gave way to other jobs (a refining round) has no holder.
    holder = Job.lease_owner.is_(None) if job.lease_owner is None else Job.lease_owner == job.lease_owner
    held_by = f" ({job.lease_owner})" if job.lease_owner else ""
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING, holder)
        .values(
            status=JobStatus.QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            not_before=None,
            error=f"the server running attempt {job.attempts}{held_by} stopped; resumed",
            deadline_at=now + timedelta(seconds=timeout),
            updated_at=now,
        )
    )


# The job -----------------------------------------------------------------------------------------------


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
    tracker = FirstRunProgress(context, device.name, spent, profile_s, estimated_fit_seconds(spec.fit))
    summaries: list[RunSummary] = []
    if profile_s > 0:
        summaries.append(profile_local_device(device, spec, context, tracker, spec.kinds, seconds=profile_s))
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
    worker = get_settings().worker

    def store(session: Session) -> dict[str, Any]:
        predictor = store_predictor(session, device.id, fitted)
        logger.info(
            "first run: device %r is ready: predictor version %d fitted on %d networks in %s",
            device.name,
            predictor.version,
            fitted.samples,
            format_duration(fitted.seconds),
        )
        if spec.refine_minutes > 0 and active_job(session, JobKind.REFINE, device.id) is None:
            refining = queue_refine(session, refine_input(spec, 1), worker)
            logger.info(
                "first run: refining device %r in the background for %s in %d round(s) (job %d)",
                device.name,
                format_duration(spec.refine_minutes * 60),
                spec.refine_rounds,
                refining.id,
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
    device: Device, spec: BootstrapInput, context: JobContext, tracker: FirstRunProgress
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
        summary = profile_local_device(device, spec, context, tracker, ["network"], max_samples=missing)
        summaries.append(summary)
        if summary.measured == 0:  # the families have no network samples left
            break
    return summaries


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
