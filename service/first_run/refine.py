"""Refining the local device's predictor in the background, round by round, once it is ready.

The first predictor comes from a few minutes of profiling. Refining goes on for
``LPNET_FIRST_RUN__REFINE_MINUTES`` more, in ``LPNET_FIRST_RUN__REFINE_ROUNDS`` rounds; each round is
one ``refine`` job that profiles the first run's families and kinds for its share of the time, with
the generated networks picked where the newest predictor's ensemble disagrees most (nn-Meter's
adaptive sampling: the sampler's scorer hook, rating candidates by `LatencyPredictor.log_spread`), then refits on
everything measured and stores the next predictor version. Latency answers use the newest version, so
each round's predictor serves as soon as it is stored.

The bootstrap queues round 1 in the transaction that stores predictor version 1; each round queues the
next in the transaction that stores its version, and the last one marks the device refined. Like the
bootstrap, a round runs only in the server's own workers, commits every measurement as it finishes,
and skips the sample keys stored when it runs again, with what is left of its time: a round whose
server was killed is put back in the queue by the next start, and a failed one is queued again
(`service.first_run.bootstrap.start_first_run`). The device stays ready on the version it has
throughout.

A ready device has users: between measurements a round gives way to any other queued job (a plan, a
fit). It is deferred (`Deferred`) and resumes once they are done, so they never wait for the refining.

The device's status says ``refining`` with percent and ETA over all rounds, and the predictor version
in use; then ``ready`` with ``refined: true``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from service.config import WorkerSettings, get_settings
from service.db.base import utcnow
from service.db.models import Device, Job, JobStatus
from service.devices import latest_predictor, set_device_status
from service.errors import InvalidInput, NotFound
from service.first_run.local_profile import (
    BootstrapInput,
    estimated_fit_seconds,
    profile_local_device,
    profiling_seconds,
)
from service.first_run.progress import FirstRunProgress, format_duration
from service.jobs.context import JobContext
from service.jobs.kinds import JobKind, job_timeout_seconds
from service.jobs.queue import ClaimedJob, Deferred, TaskOutcome, enqueue
from service.predictors import (
    FittedPredictor,
    NoPredictor,
    UnreadablePredictor,
    fit_from_samples,
    load_predictor_artifact,
    store_predictor,
)
from service.training_set import training_samples

if TYPE_CHECKING:
    from lpnet.predictor.predict import LatencyPredictor
    from profiler.sampling import Sample, Scorer

logger = logging.getLogger(__name__)

# A round that gave way to other jobs is claimed again after this long (and after those jobs).
GIVE_WAY_SECONDS = 1.0
# A round waiting for the refit of a predictor this lpnet cannot read looks again after this long.
REFIT_WAIT_SECONDS = 5.0


class RefineInput(BootstrapInput):
    """The input of one refining round: the first run's, with this round's profiling time as
    `budget_minutes` (`refine_minutes` / `refine_rounds`)."""

    round: int = Field(ge=1)

    @model_validator(mode="after")
    def _round_in_range(self) -> RefineInput:
        if self.round > self.refine_rounds:
            raise ValueError(f"round {self.round} is past the last of {self.refine_rounds}")
        return self

    @property
    def stage(self) -> str:
        """The round, heading its messages and log lines."""
        return f"refining, round {self.round} of {self.refine_rounds}"

    def round_seconds(self) -> float:
        """The estimated time of one round: its profiling and its fit."""
        return self.budget_minutes * 60 + estimated_fit_seconds(self.fit)


def refine_input(spec: BootstrapInput, round_: int) -> RefineInput:
    """Round `round_` of the refining that follows the first run of `spec`."""
    values = {
        **spec.model_dump(),
        "budget_minutes": spec.refine_minutes / spec.refine_rounds,
        "round": round_,
    }
    return RefineInput.model_validate(values)


def queue_refine(
    session: Session, spec: RefineInput, worker: WorkerSettings, *, resumed: bool = False
) -> Job:
    """Queue a refining round and show it in the device's status (the caller commits)."""
    job_input = spec.model_dump(mode="json")
    job = enqueue(
        session,
        JobKind.REFINE,
        job_input,
        device_id=spec.device_id,
        max_attempts=worker.max_attempts,
        timeout_seconds=job_timeout_seconds(JobKind.REFINE, job_input, worker),
    )
    device = session.get(Device, spec.device_id)
    if device is not None:
        device.status = queued_refine_status(job.id, spec, resumed=resumed)
    return job


def queued_refine_status(job_id: int, spec: RefineInput, *, resumed: bool) -> dict[str, Any]:
    """The device's status while a round waits for a worker: progress at the start of the round."""
    what = "resuming with the measurements stored" if resumed else "queued"
    return {
        "phase": "refining",
        "percent": round(100.0 * (spec.round - 1) / spec.refine_rounds, 1),
        "eta_seconds": round((spec.refine_rounds - spec.round + 1) * spec.round_seconds(), 1),
        "message": f"{spec.stage}: {what}; the device answers with its newest predictor meanwhile",
        "job_id": job_id,
        "updated_at": utcnow().isoformat(),
    }


def next_refine_round(session: Session, device_id: int, rounds: int) -> int | None:
    """The round that comes after the device's last successful one, or None when `rounds` are done."""
    done = 0
    for job_input in session.scalars(
        select(Job.input).where(
            Job.kind == JobKind.REFINE, Job.device_id == device_id, Job.status == JobStatus.SUCCEEDED
        )
    ):
        number = job_input.get("round") if isinstance(job_input, dict) else None
        if isinstance(number, int):
            done = max(done, number)
    return done + 1 if done < rounds else None


def other_job_waiting(session: Session, job_id: int) -> bool:
    """Whether a job other than `job_id` is queued and due: a worker would run it now."""
    now = utcnow()
    waiting = session.scalar(
        select(Job.id)
        .where(
            Job.id != job_id,
            Job.status == JobStatus.QUEUED,
            or_(Job.not_before.is_(None), Job.not_before <= now),
            or_(Job.deadline_at.is_(None), Job.deadline_at > now),
        )
        .limit(1)
    )
    return waiting is not None


def _give_way(context: JobContext, spec: RefineInput, percent: float) -> None:
    """Defer the round while another job waits, so that the worker runs that one first.

    Raises:
        Deferred: Another job is queued.
    """
    with context.factory() as session:
        if not other_job_waiting(session, context.job.id):
            return
    message = f"{spec.stage}: paused while other jobs run; it resumes after them"
    context.progress("waiting", percent, message=message, device_phase="refining", force=True)
    raise Deferred(GIVE_WAY_SECONDS, "waiting", message)


def run_refine_job(job: ClaimedJob, context: JobContext) -> TaskOutcome:
    """A refining round: profile where the newest predictor is least sure, refit, store the next version."""
    spec = RefineInput.model_validate(job.input)
    at_start = 100.0 * (spec.round - 1) / spec.refine_rounds
    _give_way(context, spec, at_start)
    with context.factory() as session:
        device = session.get(Device, spec.device_id)
        if device is None:
            raise NotFound(
                f"device {spec.device_id} was deleted before it was refined", {"device_id": spec.device_id}
            )
        if not device.is_local:
            raise InvalidInput(f"device {device.name!r} is remote; the first run refines this machine only")
        serving = latest_predictor(session, device)
        if serving is None:
            raise NoPredictor(f"device {device.name!r} has no predictor to refine", {"device": device.name})
        serving_version = serving.version
        predictor = _sampling_predictor(session, context, spec, serving.id, at_start)
        queued_at = session.scalar(select(Job.created_at).where(Job.id == job.id))
        spent = profiling_seconds(session, device.id, since=queued_at)
        session.expunge(device)
    round_s = spec.budget_minutes * 60
    fit_s = estimated_fit_seconds(spec.fit)
    profile_s = max(0.0, round_s - spent)
    tracker = FirstRunProgress(
        context,
        device.name,
        (spec.round - 1) * spec.round_seconds() + min(spent, round_s),
        profile_s,
        fit_s,
        later_s=(spec.refine_rounds - spec.round) * spec.round_seconds(),
        stage=spec.stage,
        device_phase="refining",
        check=lambda: _give_way(context, spec, tracker.percent),
    )
    measured = 0
    if profile_s > 0:
        summary = profile_local_device(
            device,
            spec,
            context,
            tracker,
            spec.kinds,
            seconds=profile_s,
            scorer=disagreement(predictor) if predictor is not None else None,
        )
        measured, spent = summary.measured, spent + summary.seconds
    context.check()

    with context.factory() as session:
        samples = training_samples(session, device.id)
    tracker.fitting_started(len(samples.samples))
    fitted = fit_from_samples(samples, tracker.fitting, spec.fit)
    context.check()
    store = _store_round(spec, device, fitted, job.id, get_settings().worker)
    result = {
        "device_id": device.id,
        "device": device.name,
        "round": spec.round,
        "rounds": spec.refine_rounds,
        "sampled_by_version": serving_version,
        "profiled_seconds": round(spent, 1),
        "measured_this_run": measured,
        "samples": fitted.samples,
        "fit_seconds": round(fitted.seconds, 2),
        "metrics": fitted.metrics,
        "training_fingerprint": fitted.fingerprint,
    }
    return TaskOutcome(result=result, store=store)


def _store_round(
    spec: RefineInput, device: Device, fitted: FittedPredictor, job_id: int, worker: WorkerSettings
) -> Callable[[Session], dict[str, Any]]:
    """What a round stores with its success: the next predictor version, then the next round, or
    after the last one the device's refined status."""

    def store(session: Session) -> dict[str, Any]:
        stored = store_predictor(session, device.id, fitted)
        if spec.round < spec.refine_rounds:
            queue_refine(session, refine_input(spec, spec.round + 1), worker)
        else:
            stored_device = session.get(Device, device.id)
            if stored_device is not None:
                stored_device.status = {
                    "phase": "ready",
                    "refined": True,
                    "message": f"predictor version {stored.version}, refined in {spec.refine_rounds} "
                    "round(s) of profiling where the predictor was least sure",
                    "job_id": job_id,
                    "updated_at": utcnow().isoformat(),
                }
        logger.info(
            "%s: device %r now answers with predictor version %d, fitted on %d networks in %s",
            spec.stage,
            device.name,
            stored.version,
            fitted.samples,
            format_duration(fitted.seconds),
        )
        return {"predictor_id": stored.id, "version": stored.version}

    return store


def refine_failed(factory: sessionmaker[Session], job: ClaimedJob, error: str) -> None:
    """Show a failed round in the device's status: it stays ready on its predictor; the next start
    queues the round again."""
    logger.error("refining failed: %s", error)
    if job.device_id is not None:
        set_device_status(
            factory,
            job.device_id,
            "ready",
            message=f"refining failed: {error}; the device keeps its newest predictor, the measurements are "
            "kept and the next `lpnet serve` resumes refining",
            job_id=job.id,
            refined=False,
        )


def _sampling_predictor(
    session: Session, context: JobContext, spec: RefineInput, predictor_id: int, percent: float
) -> LatencyPredictor | None:
    """The serving predictor, which rates where the round samples; None when this lpnet cannot read
    it and no refit of it is on its way (the round then samples as profiling does, and its fit
    replaces it).

    Raises:
        Deferred: While a refit of the unreadable predictor is queued or running.
    """
    try:
        return load_predictor_artifact(session, predictor_id)
    except UnreadablePredictor as exc:
        refit = exc.details.get("refit_job_id")
        if refit is None:
            logger.warning("%s: sampling without a predictor's guidance: %s", spec.stage, exc.message)
            return None
        message = f"{spec.stage}: waiting for the refit of the predictor it would sample by (job {refit})"
        context.progress("waiting", percent, message=message, force=True)
        raise Deferred(REFIT_WAIT_SECONDS, "waiting", message) from exc


def disagreement(predictor: LatencyPredictor) -> Scorer:
    """Rates candidate samples by how much the predictor's ensemble members disagree on their network."""

    def score(candidates: Sequence[Sample]) -> list[float]:
        return [0.0 if s.network is None else predictor.log_spread(s.network) for s in candidates]

    return score
