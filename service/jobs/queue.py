"""The job queue: jobs live in the database, which is the one source of truth about them.

A worker claims a job by taking a lease on it (owner + expiry): on PostgreSQL with
``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent workers pass over each other's rows, on SQLite with
a conditional ``UPDATE`` that only one writer can win. While the job runs its worker renews the lease;
a job whose lease lapsed (its worker died) can be claimed again, up to ``max_attempts`` claims, after
which it is failed with the reason. Every state change is conditional on the lease owner, so a worker
that lost its lease cannot overwrite what the new owner does, and a result is written in the same
statement as the status that makes it visible.

A task that waits for something outside the service (a remote device's agent measuring a network)
raises `Deferred`: its job stays running but gives up its lease and its worker, and is claimed again,
without spending an attempt, once ``not_before`` has passed; it then runs from the start. Every job
has a deadline (``deadline_at``, from its kind's timeout when it is queued): a running job past it is
stopped by its worker (`service.jobs.worker`), a queued or deferred one is failed by `sweep_expired`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, case, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import utcnow
from service.db.models import Job, JobStatus
from service.errors import NotFound

if TYPE_CHECKING:
    from service.schemas.jobs import JobAccepted

logger = logging.getLogger(__name__)

# Errors are stored whole up to this length; longer ones are cut (a traceback belongs in the log).
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class ClaimedJob:
    """A snapshot of a job a worker holds the lease of.

    Attributes:
        deadline_at: When the job must have ended (None for a job queued without one).
        timeout_seconds: The timeout the deadline was set from (deadline minus the time it was queued).
        resumed: The job was deferred before: this run starts it again from the beginning.
    """

    id: int
    kind: str
    device_id: int | None
    input: dict[str, Any]
    attempt: int
    max_attempts: int
    owner: str
    deadline_at: datetime | None = None
    timeout_seconds: float | None = None
    resumed: bool = False


class Deferred(Exception):
    """Raised by a task whose job must wait for something outside the service before it can go on.

    The worker keeps the job running but releases it (no lease, no worker thread, no attempt spent)
    until `retry_after_seconds` have passed; then a worker claims it and runs its task from the start,
    so the task must find what it already has (e.g. measurements stored meanwhile) and get that far at
    once. `phase` and `message` are the job's progress while it waits.
    """

    def __init__(self, retry_after_seconds: float, phase: str, message: str) -> None:
        super().__init__(message)
        self.retry_after_seconds = max(0.0, retry_after_seconds)
        self.phase = phase
        self.message = message


@dataclass
class TaskOutcome:
    """What a task hands back.

    Attributes:
        result: JSON-serialisable result, stored with the job.
        store: Writes further rows (e.g. a predictor) in the transaction that marks the job
            succeeded; what it returns is merged into the result. Either both land or neither.
    """

    result: dict[str, Any] = field(default_factory=dict)
    store: Callable[[Session], dict[str, Any]] | None = None


def enqueue(
    session: Session,
    kind: str,
    job_input: dict[str, Any],
    *,
    device_id: int | None = None,
    max_attempts: int = 3,
    key_id: int | None = None,
    timeout_seconds: float | None = None,
) -> Job:
    """Add a queued job (the caller commits).

    Args:
        key_id: The API key that asked for the job, if one did.
        timeout_seconds: How long the job may take from now to its end; by default the timeout the
            worker settings give its kind (`service.jobs.tasks.job_timeout_seconds`).
    """
    if timeout_seconds is None:
        from service.config import get_settings
        from service.jobs.tasks import job_timeout_seconds

        timeout_seconds = job_timeout_seconds(kind, job_input, get_settings().worker)
    now = utcnow()
    job = Job(
        kind=kind,
        input=job_input,
        device_id=device_id,
        max_attempts=max_attempts,
        key_id=key_id,
        created_at=now,
        updated_at=now,
        deadline_at=now + timedelta(seconds=timeout_seconds),
    )
    session.add(job)
    session.flush()
    return job


def timeout_message(timeout_seconds: float | None, circumstance: str = "") -> str:
    """The error of a job that ran out of time: ``timed out after 3600 s`` and what it was doing."""
    text = f"timed out after {round(timeout_seconds or 0.0, 1):g} s"
    return f"{text} {circumstance}" if circumstance else text


def get_job(session: Session, job_id: int, kind: str | None = None) -> Job:
    """Return job `job_id` (of `kind`, when given).

    Raises:
        NotFound: No such job.
    """
    job = session.get(Job, job_id)
    if job is None or (kind is not None and job.kind != kind):
        what = f"{kind} job" if kind else "job"
        raise NotFound(f"no {what} with id {job_id}", {"job_id": job_id})
    return job


def active_job(session: Session, kind: str, device_id: int) -> Job | None:
    """A queued or running job of `kind` for the device, if there is one."""
    return session.scalars(
        select(Job)
        .where(
            Job.kind == kind,
            Job.device_id == device_id,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
        .order_by(Job.id)
        .limit(1)
    ).first()


def _deferred() -> ColumnElement[bool]:
    """A running job that gave up its lease to wait (`Deferred`)."""
    return and_(Job.status == JobStatus.RUNNING, Job.lease_owner.is_(None))


def _claimable(now: datetime, kinds: Collection[str] | None) -> ColumnElement[bool]:
    ready = or_(Job.not_before.is_(None), Job.not_before <= now)
    condition = and_(
        or_(Job.deadline_at.is_(None), Job.deadline_at > now),
        or_(
            and_(Job.status == JobStatus.QUEUED, ready),
            and_(_deferred(), ready),
            and_(
                Job.status == JobStatus.RUNNING,
                Job.lease_expires_at < now,
                Job.attempts < Job.max_attempts,
            ),
        ),
    )
    if kinds is not None:
        condition = and_(condition, Job.kind.in_(list(kinds)))
    return condition


def fail_abandoned(session: Session, now: datetime | None = None) -> int:
    """Fail running jobs whose lease lapsed on their last allowed attempt (the caller commits).

    Returns:
        How many jobs were failed.
    """
    now = now or utcnow()
    abandoned = session.scalars(
        select(Job).where(
            Job.status == JobStatus.RUNNING,
            Job.lease_expires_at < now,
            Job.attempts >= Job.max_attempts,
        )
    ).all()
    failed = 0
    for job in abandoned:
        message = (
            f"the worker running attempt {job.attempts} of {job.max_attempts} ({job.lease_owner}) stopped "
            f"renewing its lease (it crashed or was killed); no attempts are left"
        )
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.lease_owner == job.lease_owner)
            .values(
                status=JobStatus.FAILED, error=message, finished_at=now, lease_expires_at=None, updated_at=now
            )
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            failed += 1
            logger.warning("job %d (%s) failed: %s", job.id, job.kind, message)
    return failed


def sweep_expired(
    factory: sessionmaker[Session], now: datetime | None = None
) -> list[tuple[ClaimedJob, str]]:
    """Fail the jobs past their deadline that no worker is running: queued, deferred, or left behind by a
    worker that stopped renewing its lease. A running job with a live lease is its worker's to stop.

    Returns:
        Each job failed (as its last claim saw it, for failure hooks) and its error.
    """
    now = now or utcnow()
    unattended = or_(
        Job.status == JobStatus.QUEUED,
        _deferred(),
        and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
    )
    failed: list[tuple[ClaimedJob, str]] = []
    with factory() as session:
        expired = session.scalars(
            select(Job).where(
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), Job.deadline_at < now, unattended
            )
        ).all()
        for job in expired:
            timeout = _timeout_seconds(job)
            if job.status == JobStatus.QUEUED:
                circumstance = (
                    "before a worker could finish it" if job.attempts else "before a worker started it"
                )
            elif job.lease_owner is None:
                phase = (job.progress or {}).get("phase", "deferred")
                circumstance = f"while waiting ({phase})"
            else:
                circumstance = f"after its worker ({job.lease_owner}) stopped renewing its lease"
            message = timeout_message(timeout, circumstance)
            same_holder = (
                Job.lease_owner.is_(None) if job.lease_owner is None else Job.lease_owner == job.lease_owner
            )
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job.id, Job.status == job.status, same_holder, Job.deadline_at < now, unattended
                )
                .values(
                    status=JobStatus.FAILED,
                    error=message,
                    finished_at=now,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                logger.warning("job %d (%s) failed: %s", job.id, job.kind, message)
                failed.append((_snapshot(job, job.lease_owner or ""), message))
        session.commit()
    return failed


def _timeout_seconds(job: Job) -> float | None:
    if job.deadline_at is None:
        return None
    return (job.deadline_at - job.created_at).total_seconds()


def _snapshot(job: Job, owner: str) -> ClaimedJob:
    return ClaimedJob(
        id=job.id,
        kind=job.kind,
        device_id=job.device_id,
        input=dict(job.input),
        attempt=job.attempts,
        max_attempts=job.max_attempts,
        owner=owner,
        deadline_at=job.deadline_at,
        timeout_seconds=_timeout_seconds(job),
        resumed=job.not_before is not None,
    )


def claim_job(
    factory: sessionmaker[Session],
    owner: str,
    lease_seconds: float,
    kinds: Collection[str] | None = None,
    now: datetime | None = None,
) -> ClaimedJob | None:
    """Take the lease of the oldest claimable job, or return None when there is none.

    Claimable, unless past its deadline: queued or deferred with its ``not_before`` passed, or running
    with a lapsed lease and attempts left. Abandoned jobs without attempts left are failed on the way.
    """
    now = now or utcnow()
    with factory() as session:
        if fail_abandoned(session, now):
            session.commit()
        if session.get_bind().dialect.name == "postgresql":
            job_id = _claim_postgres(session, owner, lease_seconds, kinds, now)
        else:
            job_id = _claim_conditional(session, owner, lease_seconds, kinds, now)
        if job_id is None:
            session.rollback()
            return None
        session.commit()
        job = session.get(Job, job_id)
        assert job is not None
        claimed = _snapshot(job, owner)
    logger.info("%s claimed job %d (%s), attempt %d", owner, claimed.id, claimed.kind, claimed.attempt)
    return claimed


def _lease_values(owner: str, lease_seconds: float, now: datetime) -> dict[str, Any]:
    return {
        "status": JobStatus.RUNNING,
        "lease_owner": owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        # Resuming a deferred job is not another attempt: waiting is not failing.
        "attempts": case((_deferred(), Job.attempts), else_=Job.attempts + 1),
        "updated_at": now,
    }


def _claim_postgres(
    session: Session, owner: str, lease_seconds: float, kinds: Collection[str] | None, now: datetime
) -> int | None:
    # The row lock is held until commit; other workers' SKIP LOCKED passes over it meanwhile.
    job_id = session.scalars(
        select(Job.id)
        .where(_claimable(now, kinds))
        .order_by(Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    if job_id is None:
        return None
    session.execute(update(Job).where(Job.id == job_id).values(**_lease_values(owner, lease_seconds, now)))
    return job_id


def _claim_conditional(
    session: Session, owner: str, lease_seconds: float, kinds: Collection[str] | None, now: datetime
) -> int | None:
    # SQLite has one writer at a time: the UPDATE re-checks the condition, so of two workers that saw
    # the same candidate only one changes a row; the other moves on to the next candidate.
    candidates = session.scalars(
        select(Job.id).where(_claimable(now, kinds)).order_by(Job.created_at, Job.id).limit(8)
    ).all()
    for job_id in candidates:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, _claimable(now, kinds))
            .values(**_lease_values(owner, lease_seconds, now))
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return job_id
    return None


def _owned(job_id: int, owner: str) -> ColumnElement[bool]:
    return and_(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)


def renew_lease(factory: sessionmaker[Session], job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when `owner` no longer holds it (the job was reclaimed or finished)."""
    now = utcnow()
    with factory() as session:
        result = session.execute(
            update(Job)
            .where(_owned(job_id, owner))
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        )
        session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record_progress(
    factory: sessionmaker[Session], job_id: int, owner: str, progress: dict[str, Any]
) -> bool:
    """Store the job's progress; False when `owner` no longer holds the lease."""
    with factory() as session:
        result = session.execute(
            update(Job).where(_owned(job_id, owner)).values(progress=progress, updated_at=utcnow())
        )
        session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def defer_job(factory: sessionmaker[Session], job: ClaimedJob, deferral: Deferred) -> bool:
    """Release a running job until `deferral.retry_after_seconds` have passed (see `Deferred`).

    Returns:
        False when `job.owner` no longer held the lease.
    """
    now = utcnow()
    with factory() as session:
        result = session.execute(
            update(Job)
            .where(_owned(job.id, job.owner))
            .values(
                lease_owner=None,
                lease_expires_at=None,
                not_before=now + timedelta(seconds=deferral.retry_after_seconds),
                progress={"phase": deferral.phase, "message": deferral.message},
                updated_at=now,
            )
        )
        session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def wake_job(session: Session, job_id: int) -> bool:
    """Make a deferred job claimable at once, e.g. when what it waits for arrived (the caller commits).

    Returns:
        Whether the job was deferred and now is due.
    """
    now = utcnow()
    result = session.execute(
        update(Job).where(Job.id == job_id, _deferred(), Job.not_before > now).values(not_before=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def complete_job(factory: sessionmaker[Session], job: ClaimedJob, outcome: TaskOutcome) -> bool:
    """Mark the job succeeded with its result, and run `outcome.store`, in one transaction.

    Returns:
        False (and nothing is written) when the worker no longer holds the lease.
    """
    now = utcnow()
    with factory() as session:
        # The first statement takes the row (PostgreSQL row lock, SQLite write lock) so no one can
        # reclaim the job between the check and the commit.
        result = session.execute(
            update(Job)
            .where(_owned(job.id, job.owner))
            .values(
                status=JobStatus.SUCCEEDED,
                finished_at=now,
                lease_expires_at=None,
                updated_at=now,
                error=None,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            logger.warning("job %d: lease lost before completion; result discarded", job.id)
            return False
        stored = outcome.store(session) if outcome.store is not None else {}
        session.execute(update(Job).where(Job.id == job.id).values(result={**outcome.result, **stored}))
        session.commit()
    return True


def fail_job(factory: sessionmaker[Session], job: ClaimedJob, error: str, *, retry: bool) -> JobStatus | None:
    """Record a failed attempt: back to the queue when `retry` and attempts are left, else failed.

    Returns:
        The job's new status, or None when the worker no longer held the lease.
    """
    now = utcnow()
    error = error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 3] + "..."
    requeue = retry and job.attempt < job.max_attempts
    values: dict[str, Any] = {"error": error, "lease_expires_at": None, "updated_at": now}
    if requeue:
        values.update(status=JobStatus.QUEUED, progress=None)
    else:
        values.update(status=JobStatus.FAILED, finished_at=now)
    with factory() as session:
        result = session.execute(update(Job).where(_owned(job.id, job.owner)).values(**values))
        session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return JobStatus.QUEUED if requeue else JobStatus.FAILED


def job_accepted(job: Job, status_path: str = "/v1/jobs") -> JobAccepted:
    """The 202 answer for a job just queued."""
    from service.schemas.jobs import JobAccepted

    return JobAccepted(
        job_id=job.id, kind=job.kind, status=JobStatus(job.status), status_url=f"{status_path}/{job.id}"
    )


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    kind: str | None = None,
    device_id: int | None = None,
    limit: int = 100,
) -> list[Job]:
    """The newest jobs first, filtered by status, kind and device."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if device_id is not None:
        query = query.where(Job.device_id == device_id)
    return list(session.scalars(query))
