"""Leased work in the database: one claim / lease / renew / complete / fail path, and the job queue.

Two tables hold work that is leased (owner + expiry): jobs, run by the service's workers, and agent
tasks, run by the agents of remote devices (`service.agents.tasks`). `LeaseTable` names a table's model
and the statuses its rows go through; the functions on it are the one implementation of leasing. A
claim takes the oldest claimable row: on PostgreSQL with ``SELECT ... FOR UPDATE SKIP LOCKED``, so
concurrent claimers pass over each other's rows, on SQLite with a conditional ``UPDATE`` that only one
writer can win. Every later change (renew, progress, complete, fail) is conditional on the lease owner,
so a holder that lost its lease cannot overwrite what the new owner does.

Jobs: a worker claims a job and renews the lease while its task runs; a job whose lease lapsed (its
worker died) can be claimed again, up to ``max_attempts`` claims, after which it is failed with the
reason. A result is written in the same statement as the status that makes it visible. A task that waits
for something outside the service (a remote device's agent measuring a network) raises `Deferred`: its
job stays running but gives up its lease and its worker, and is claimed again, without spending an
attempt, once ``not_before`` has passed; it then runs from the start. Every job has a deadline
(``deadline_at``, from its kind's timeout when it is queued): a running job past it is stopped by its
worker (`service.jobs.worker`), a queued or deferred one is failed by `sweep_expired`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import get_settings
from service.db.base import utcnow
from service.db.models import AgentTask, Job, JobStatus, TaskStatus
from service.errors import NotFound
from service.jobs.kinds import job_timeout_seconds
from service.pagination import Keyset, Page, PageRequest, paginate
from service.schemas.jobs import JobAccepted

logger = logging.getLogger(__name__)

# Errors are stored whole up to this length; longer ones are cut (a traceback belongs in the log).
MAX_ERROR_CHARS = 4000
# A claim on SQLite tries this many of the oldest candidates before it gives up for this poll.
CLAIM_CANDIDATES = 8


# Leasing, for every table of leased work ----------------------------------------------------------------


@dataclass(frozen=True)
class LeaseTable:
    """A table of leased work: its model, the statuses its rows go through, and its name in logs."""

    model: type[Job] | type[AgentTask]
    name: str
    queued: str
    held: str
    succeeded: str
    failed: str


JOBS = LeaseTable(Job, "job", JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED)
AGENT_TASKS = LeaseTable(
    AgentTask, "agent task", TaskStatus.QUEUED, TaskStatus.LEASED, TaskStatus.SUCCEEDED, TaskStatus.FAILED
)


@dataclass(frozen=True)
class LapsedLease:
    """A row whose holder stopped renewing its lease, as it was ended.

    Attributes:
        failed: No attempts were left: the row failed (else it went back to the queue).
        error: The reason stored on the row.
    """

    id: int
    kind: str
    owner: str | None
    attempts: int
    max_attempts: int
    failed: bool
    error: str


def clip_error(error: str) -> str:
    """An error as stored: without NUL characters (PostgreSQL text cannot hold them), cut to length."""
    error = error.replace("\x00", "")
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 3] + "..."


def held_by(table: LeaseTable, row_id: int, owner: str) -> ColumnElement[bool]:
    """Row `row_id` is under a lease `owner` holds."""
    model = table.model
    return and_(model.id == row_id, model.lease_owner == owner, model.status == table.held)


def lease_values(
    table: LeaseTable, owner: str, lease_seconds: float, now: datetime, attempts: Any = None
) -> dict[str, Any]:
    """What a claim sets: held by `owner` until a lease length from now, one more attempt unless
    `attempts` (a value or SQL expression) says otherwise."""
    return {
        "status": table.held,
        "lease_owner": owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "attempts": table.model.attempts + 1 if attempts is None else attempts,
        "updated_at": now,
    }


def claim_row(
    session: Session, table: LeaseTable, claimable: ColumnElement[bool], values: dict[str, Any]
) -> int | None:
    """Set `values` (see `lease_values`) on the oldest row that is `claimable`; its id, or None when no
    row is (the caller commits, which ends the claim)."""
    model = table.model
    oldest = select(model.id).where(claimable).order_by(model.created_at, model.id)
    if session.get_bind().dialect.name == "postgresql":
        # The row lock is held until commit; other claimers' SKIP LOCKED passes over it meanwhile.
        row_id = session.scalars(oldest.limit(1).with_for_update(skip_locked=True)).first()
        if row_id is None:
            return None
        session.execute(update(model).where(model.id == row_id).values(**values))
        return row_id
    # SQLite has one writer at a time: the UPDATE re-checks the condition, so of two claimers that saw
    # the same candidate only one changes a row; the other moves on to the next candidate.
    for row_id in session.scalars(oldest.limit(CLAIM_CANDIDATES)).all():
        result = session.execute(update(model).where(model.id == row_id, claimable).values(**values))
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return row_id
    return None


def update_held(session: Session, table: LeaseTable, row_id: int, owner: str, values: dict[str, Any]) -> bool:
    """Set `values` on the row if `owner` holds its lease; False (nothing changed) when it does not."""
    result = session.execute(update(table.model).where(held_by(table, row_id, owner)).values(**values))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def renewal_values(
    lease_seconds: float, now: datetime, progress: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a renewal sets: the lease a lease length from now, and the progress when given."""
    values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
    if progress is not None:
        values["progress"] = progress
    return values


def completion_values(table: LeaseTable, now: datetime) -> dict[str, Any]:
    """What a completion sets: succeeded, finished now, no lease, no error."""
    return {
        "status": table.succeeded,
        "finished_at": now,
        "lease_expires_at": None,
        "error": None,
        "updated_at": now,
    }


def failure_values(table: LeaseTable, error: str, now: datetime, *, requeue: bool) -> dict[str, Any]:
    """What a failed attempt sets: back to the queue (no holder, no progress) when `requeue`, else failed."""
    values: dict[str, Any] = {"error": clip_error(error), "lease_expires_at": None, "updated_at": now}
    if requeue:
        values.update(status=table.queued, lease_owner=None, progress=None)
    else:
        values.update(status=table.failed, finished_at=now)
    return values


def end_lapsed_leases(
    session: Session,
    table: LeaseTable,
    explain: Callable[[LapsedLease], str],
    now: datetime,
    *,
    requeue: bool,
    scope: ColumnElement[bool] | None = None,
) -> list[LapsedLease]:
    """End the leases that lapsed (within `scope`): fail the rows without attempts left and, with
    `requeue`, put the others back in the queue; without it they stay held, for a claim to take over.
    `explain` words the error of each (it is given the row with ``error`` empty). The caller commits.

    Returns:
        The rows this call ended (a row another process ended meanwhile is left out).
    """
    model = table.model
    condition = and_(model.status == table.held, model.lease_expires_at < now)
    if not requeue:
        condition = and_(condition, model.attempts >= model.max_attempts)
    if scope is not None:
        condition = and_(condition, scope)
    rows = session.execute(
        select(model.id, model.kind, model.lease_owner, model.attempts, model.max_attempts).where(condition)
    ).all()
    ended: list[LapsedLease] = []
    for row_id, kind, owner, attempts, max_attempts in rows:
        lapsed = LapsedLease(row_id, kind, owner, attempts, max_attempts, attempts >= max_attempts, "")
        lapsed = replace(lapsed, error=clip_error(explain(lapsed)))
        result = session.execute(
            update(model)
            .where(model.id == row_id, model.lease_owner == owner, condition)
            .values(**failure_values(table, lapsed.error, now, requeue=not lapsed.failed))
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            logger.warning("%s %d (%s): %s", table.name, row_id, kind, lapsed.error)
            ended.append(lapsed)
    return ended


# The job queue -----------------------------------------------------------------------------------------


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
            worker settings give its kind (`service.jobs.kinds.job_timeout_seconds`).
    """
    if timeout_seconds is None:
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


def _abandoned_message(lapsed: LapsedLease) -> str:
    return (
        f"the worker running attempt {lapsed.attempts} of {lapsed.max_attempts} ({lapsed.owner}) stopped "
        f"renewing its lease (it crashed or was killed); no attempts are left"
    )


def fail_abandoned(session: Session, now: datetime | None = None) -> int:
    """Fail running jobs whose lease lapsed on their last allowed attempt (the caller commits).

    Returns:
        How many jobs were failed.
    """
    return len(end_lapsed_leases(session, JOBS, _abandoned_message, now or utcnow(), requeue=False))


def _expiry_circumstance(job: Job) -> str:
    """What an expired job was doing when its deadline passed, for its error."""
    if job.status == JobStatus.QUEUED:
        return "before a worker could finish it" if job.attempts else "before a worker started it"
    if job.lease_owner is None:
        return f"while waiting ({(job.progress or {}).get('phase', 'deferred')})"
    return f"after its worker ({job.lease_owner}) stopped renewing its lease"


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
            message = timeout_message(_timeout_seconds(job), _expiry_circumstance(job))
            same_holder = (
                Job.lease_owner.is_(None) if job.lease_owner is None else Job.lease_owner == job.lease_owner
            )
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job.id, Job.status == job.status, same_holder, Job.deadline_at < now, unattended
                )
                .values(**failure_values(JOBS, message, now, requeue=False))
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
    # Resuming a deferred job is not another attempt: waiting is not failing.
    attempts = case((_deferred(), Job.attempts), else_=Job.attempts + 1)
    with factory() as session:
        if fail_abandoned(session, now):
            session.commit()
        job_id = claim_row(
            session, JOBS, _claimable(now, kinds), lease_values(JOBS, owner, lease_seconds, now, attempts)
        )
        if job_id is None:
            session.rollback()
            return None
        session.commit()
        job = session.get(Job, job_id)
        assert job is not None
        claimed = _snapshot(job, owner)
    logger.info("%s claimed job %d (%s), attempt %d", owner, claimed.id, claimed.kind, claimed.attempt)
    return claimed


def _update_own_job(factory: sessionmaker[Session], job_id: int, owner: str, values: dict[str, Any]) -> bool:
    with factory() as session:
        held = update_held(session, JOBS, job_id, owner, values)
        session.commit()
    return held


def renew_lease(factory: sessionmaker[Session], job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when `owner` no longer holds it (the job was reclaimed or finished)."""
    return _update_own_job(factory, job_id, owner, renewal_values(lease_seconds, utcnow()))


def record_progress(
    factory: sessionmaker[Session], job_id: int, owner: str, progress: dict[str, Any]
) -> bool:
    """Store the job's progress; False when `owner` no longer holds the lease."""
    return _update_own_job(factory, job_id, owner, {"progress": progress, "updated_at": utcnow()})


def defer_job(factory: sessionmaker[Session], job: ClaimedJob, deferral: Deferred) -> bool:
    """Release a running job until `deferral.retry_after_seconds` have passed (see `Deferred`).

    Returns:
        False when `job.owner` no longer held the lease.
    """
    now = utcnow()
    values = {
        "lease_owner": None,
        "lease_expires_at": None,
        "not_before": now + timedelta(seconds=deferral.retry_after_seconds),
        "progress": {"phase": deferral.phase, "message": deferral.message},
        "updated_at": now,
    }
    return _update_own_job(factory, job.id, job.owner, values)


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
    with factory() as session:
        # The first statement takes the row (PostgreSQL row lock, SQLite write lock) so no one can
        # reclaim the job between the check and the commit.
        if not update_held(session, JOBS, job.id, job.owner, completion_values(JOBS, utcnow())):
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
    requeue = retry and job.attempt < job.max_attempts
    if not _update_own_job(
        factory, job.id, job.owner, failure_values(JOBS, error, utcnow(), requeue=requeue)
    ):
        return None
    return JobStatus.QUEUED if requeue else JobStatus.FAILED


def job_accepted(job: Job, status_path: str = "/v1/jobs") -> JobAccepted:
    """The 202 answer for a job just queued."""
    return JobAccepted(
        job_id=job.id, kind=job.kind, status=JobStatus(job.status), status_url=f"{status_path}/{job.id}"
    )


JOB_LIST = Keyset("jobs", Job.id, descending=True)


def list_jobs(
    session: Session,
    page: PageRequest,
    *,
    status: str | None = None,
    kind: str | None = None,
    device_id: int | None = None,
) -> Page[Job]:
    """A page of the jobs, newest first, filtered by status, kind and device."""
    query = select(Job)
    if status is not None:
        query = query.where(Job.status == status)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if device_id is not None:
        query = query.where(Job.device_id == device_id)
    return paginate(session, query, JOB_LIST, page, {"status": status, "kind": kind, "device_id": device_id})
