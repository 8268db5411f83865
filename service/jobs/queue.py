"""The job queue: jobs live in the database, which is the one source of truth about them.

A worker claims a job by taking a lease on it (owner + expiry): on PostgreSQL with
``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent workers pass over each other's rows, on SQLite with
a conditional ``UPDATE`` that only one writer can win. While the job runs its worker renews the lease;
a job whose lease lapsed (its worker died) can be claimed again, up to ``max_attempts`` claims, after
which it is failed with the reason. Every state change is conditional on the lease owner, so a worker
that lost its lease cannot overwrite what the new owner does, and a result is written in the same
statement as the status that makes it visible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, or_, select, update
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
    """A snapshot of a job a worker holds the lease of."""

    id: int
    kind: str
    device_id: int | None
    input: dict[str, Any]
    attempt: int
    max_attempts: int
    owner: str


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
) -> Job:
    """Add a queued job (the caller commits)."""
    job = Job(kind=kind, input=job_input, device_id=device_id, max_attempts=max_attempts)
    session.add(job)
    session.flush()
    return job


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


def _claimable(now: datetime, kinds: Collection[str] | None) -> ColumnElement[bool]:
    condition = or_(
        Job.status == JobStatus.QUEUED,
        and_(
            Job.status == JobStatus.RUNNING,
            Job.lease_expires_at < now,
            Job.attempts < Job.max_attempts,
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


def claim_job(
    factory: sessionmaker[Session],
    owner: str,
    lease_seconds: float,
    kinds: Collection[str] | None = None,
    now: datetime | None = None,
) -> ClaimedJob | None:
    """Take the lease of the oldest claimable job, or return None when there is none.

    Claimable: queued, or running with a lapsed lease and attempts left. Abandoned jobs without
    attempts left are failed on the way.
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
        claimed = ClaimedJob(
            id=job.id,
            kind=job.kind,
            device_id=job.device_id,
            input=dict(job.input),
            attempt=job.attempts,
            max_attempts=job.max_attempts,
            owner=owner,
        )
    logger.info("%s claimed job %d (%s), attempt %d", owner, claimed.id, claimed.kind, claimed.attempt)
    return claimed


def _lease_values(owner: str, lease_seconds: float, now: datetime) -> dict[str, Any]:
    return {
        "status": JobStatus.RUNNING,
        "lease_owner": owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "attempts": Job.attempts + 1,
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
