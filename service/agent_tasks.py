"""Tasks for the agents of remote devices: queue, lease, renew, complete, fail; plan verification.

An agent leases the oldest queued task of its device: on PostgreSQL with ``SELECT ... FOR UPDATE SKIP
LOCKED``, so concurrent agents pass over each other's rows, on SQLite with a conditional ``UPDATE`` only
one writer can win (the pattern of `service.jobs.queue`). Heartbeats renew the lease. A lease that
lapsed (its agent died or lost the server) is reclaimed lazily, the next time an agent of the device
asks for work: the task goes back to the queue, or fails with the reason once `max_attempts` leases
were spent. An agent that restarts with the same agent id gets its own unexpired task back and
continues it. Completing is idempotent: the same agent sending the same result again changes nothing.

A plan with ``verify`` on a remote device measures through these tasks: `remote_measure` queues a
verify task per pruned network and defers the plan job (no worker thread waits) until the device's
agent measured it; completing or failing the task wakes the plan, which then plans again from the
start and finds the measurements it has.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from lpnet.errors import LpnetError
from profiler.coverage import OP_COVERAGE_FAMILY
from service.config import AgentSettings, Settings
from service.db.base import utcnow
from service.db.models import (
    AgentTask,
    ApiKey,
    Device,
    KeyScope,
    LayerMeasurement,
    MeasurementContext,
    NetworkMeasurement,
    TaskKind,
    TaskStatus,
)
from service.devices import latest_predictor, resolve_device
from service.errors import Conflict, InvalidInput, NotFound, PermissionDenied, ServiceError
from service.jobs.queue import MAX_ERROR_CHARS, Deferred, active_job, wake_job
from service.schemas.agent import (
    AgentDeviceRead,
    AgentHello,
    AgentHelloRead,
    AgentTaskRead,
    CampaignCreate,
    CampaignResult,
    VerifyResult,
)

if TYPE_CHECKING:
    from lpnet.arch.ir import Network
    from lpnet.gates.planner import MeasureFn
    from lpnet.gates.result import MeasuredLatency
    from profiler.protocol import TimingProtocol
    from service.jobs.worker import JobContext

logger = logging.getLogger(__name__)

OPEN_STATUSES = (TaskStatus.QUEUED, TaskStatus.LEASED)
FINISHED_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)
# A deferred plan looks at its open verify task again after a quarter of the time it has waited, within
# these bounds: an agent's completion wakes it at once (`wake_plan`), so the recheck is for what nothing
# announces (a task failed by a lapsed lease, the verify timeout), and each recheck plans again.
VERIFY_RECHECK_MIN_SECONDS = 2.0
VERIFY_RECHECK_MAX_SECONDS = 60.0
# The progress phase of a plan deferred until its device's agent measured a network.
WAITING_FOR_AGENT = "waiting_for_agent"


class LeaseLost(Conflict):
    """The agent does not hold the task's lease (any more): it lapsed and went to the queue or elsewhere."""

    code = "lease_lost"


class TaskFinished(Conflict):
    """The task succeeded, failed or was cancelled already."""

    code = "task_finished"


class AgentTaskFailed(ServiceError):
    """A verify task the plan waited for failed or was cancelled."""

    code = "agent_task_failed"
    status_code = 502


class AgentTimeout(ServiceError):
    """No agent measured a verify task in time."""

    code = "agent_timeout"
    status_code = 504


# Reading ------------------------------------------------------------------------------------------------


def describe_task(task: AgentTask, now: datetime | None = None, *, resumed: bool = False) -> AgentTaskRead:
    """A task as agents and clients see it."""
    now = now or utcnow()
    expires = task.lease_expires_at
    return AgentTaskRead(
        id=task.id,
        device_id=task.device_id,
        kind=TaskKind(task.kind),
        status=TaskStatus(task.status),
        payload=dict(task.payload or {}),
        result=task.result,
        error=task.error,
        progress=task.progress,
        job_id=task.job_id,
        lease_owner=task.lease_owner,
        lease_expires_at=expires,
        lease_expired=task.status == TaskStatus.LEASED and expires is not None and expires < now,
        attempts=task.attempts,
        max_attempts=task.max_attempts,
        created_at=task.created_at,
        updated_at=task.updated_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        resumed=resumed,
    )


def get_task(session: Session, task_id: int) -> AgentTask:
    """Return agent task `task_id`.

    Raises:
        NotFound: No such task.
    """
    task = session.get(AgentTask, task_id)
    if task is None:
        raise NotFound(f"no agent task with id {task_id}", {"task_id": task_id})
    return task


def device_for_key(session: Session, key: ApiKey, ref: int | str | None) -> Device:
    """The device an agent request is for: an agent key's own, or the one an admin key names.

    Raises:
        InvalidInput: An admin key without a device.
        NotFound: Unknown device.
        PermissionDenied: An agent key naming another device.
    """
    if key.scope == KeyScope.AGENT:
        device = session.get(Device, key.device_id)
        if device is None:  # the key's device cascade-deletes its keys; a cached key may outlive it
            raise NotFound(f"the device of API key {key.prefix} no longer exists")
        if ref is not None:
            _require_own_device(key, resolve_device(session, ref))
        return device
    if ref is None:
        raise InvalidInput(
            "an admin key may act for any device: name the device in `device` (or use the device's agent key)"
        )
    return resolve_device(session, ref)


def task_for_key(session: Session, key: ApiKey, task_id: int) -> AgentTask:
    """Task `task_id`, if the key may work on it (admin keys, or the agent key of its device).

    Raises:
        NotFound: No such task.
        PermissionDenied: The agent key of another device.
    """
    task = get_task(session, task_id)
    _require_own_device(key, task.device)
    return task


def _require_own_device(key: ApiKey, device: Device) -> None:
    if key.scope == KeyScope.AGENT and key.device_id != device.id:
        raise PermissionDenied(
            f"API key {key.prefix} is the agent key of another device; it may only work for its own device, "
            f"not {device.name!r}",
            {"device": device.name},
        )


def list_device_tasks(
    session: Session,
    device: Device,
    *,
    status: TaskStatus | None = None,
    kind: TaskKind | None = None,
    limit: int = 100,
) -> list[AgentTask]:
    """The device's tasks, newest first."""
    query = (
        select(AgentTask).where(AgentTask.device_id == device.id).order_by(AgentTask.id.desc()).limit(limit)
    )
    if status is not None:
        query = query.where(AgentTask.status == status)
    if kind is not None:
        query = query.where(AgentTask.kind == kind)
    return list(session.scalars(query))


def open_campaign(session: Session, device_id: int) -> AgentTask | None:
    """The device's oldest queued or leased profile campaign, if any."""
    return session.scalars(
        select(AgentTask)
        .where(
            AgentTask.device_id == device_id,
            AgentTask.kind == TaskKind.PROFILE_CAMPAIGN,
            AgentTask.status.in_(OPEN_STATUSES),
        )
        .order_by(AgentTask.id)
        .limit(1)
    ).first()


def device_sample_keys(session: Session, device_id: int) -> list[str]:
    """Sample keys of the device's network and isolated-layer rows: what an agent need not measure again."""
    keys = set(
        session.scalars(
            select(NetworkMeasurement.sample_key).where(NetworkMeasurement.device_id == device_id)
        )
    )
    keys.update(
        session.scalars(
            select(LayerMeasurement.sample_key).where(
                LayerMeasurement.device_id == device_id,
                LayerMeasurement.context == MeasurementContext.ISOLATED,
            )
        )
    )
    return sorted(keys)


# Queueing -----------------------------------------------------------------------------------------------


def check_families(families: Sequence[str]) -> None:
    """Refuse names that are neither torchvision classification models nor the op-coverage network.

    Raises:
        InvalidInput: Naming the unknown families and the known ones.
    """
    import torchvision

    known = set(torchvision.models.list_models(module=torchvision.models))
    unknown = [name for name in families if name not in known and name != OP_COVERAGE_FAMILY]
    if unknown:
        raise InvalidInput(
            f"unknown model families {unknown}; families are {OP_COVERAGE_FAMILY} (every IR operator) or "
            f"torchvision classification models: {', '.join(sorted(known))}",
            {"unknown": unknown},
        )


def queue_campaign(session: Session, device: Device, spec: CampaignCreate, max_attempts: int) -> AgentTask:
    """Queue a profile campaign for the device's agent (the caller commits).

    Raises:
        InvalidInput: Unknown model families.
    """
    check_families(spec.families)
    task = AgentTask(
        device_id=device.id,
        kind=TaskKind.PROFILE_CAMPAIGN,
        payload=spec.model_dump(mode="json"),
        max_attempts=max_attempts,
    )
    session.add(task)
    session.flush()
    logger.info("queued profile campaign %d for device %s", task.id, device.name)
    return task


def agent_hello(
    session: Session, device: Device, hello: AgentHello, key: ApiKey, settings: Settings
) -> AgentHelloRead:
    """Store the agent's environment on its device; queue a first campaign if asked and needed.

    The campaign is queued only when the device has no predictor, no open campaign and no fit queued
    or running, so a restarting agent does not queue one per start (the caller commits).
    """
    from service.predictors import FIT_JOB

    device.environment = hello.environment.model_dump(mode="json")
    campaign = open_campaign(session, device.id)
    has_predictor = latest_predictor(session, device) is not None
    queued = False
    if (
        hello.profile_minutes is not None
        and campaign is None
        and not has_predictor
        and active_job(session, FIT_JOB, device.id) is None
    ):
        spec = CampaignCreate(budget_minutes=hello.profile_minutes, fit_after=True)
        campaign = queue_campaign(session, device, spec, settings.agent.max_attempts)
        queued = True
    session.flush()
    logger.info("agent %s says hello for device %s", hello.agent_id, device.name)
    return AgentHelloRead(
        agent_id=hello.agent_id,
        key_scope=key.scope,
        device=AgentDeviceRead.model_validate(device),
        lease_seconds=settings.agent.lease_seconds,
        has_predictor=has_predictor,
        campaign=describe_task(campaign) if campaign is not None else None,
        campaign_queued=queued,
    )


# Leasing ------------------------------------------------------------------------------------------------


def reclaim_lapsed(session: Session, device_id: int, now: datetime | None = None) -> int:
    """Requeue the device's tasks whose lease lapsed, or fail those without attempts left (caller commits).

    Returns:
        How many tasks changed.
    """
    now = now or utcnow()
    lapsed = session.execute(
        select(
            AgentTask.id, AgentTask.kind, AgentTask.lease_owner, AgentTask.attempts, AgentTask.max_attempts
        ).where(
            AgentTask.device_id == device_id,
            AgentTask.status == TaskStatus.LEASED,
            AgentTask.lease_expires_at < now,
        )
    ).all()
    changed = 0
    for task_id, kind, owner, attempts, max_attempts in lapsed:
        values: dict[str, Any]
        what = f"agent {owner} stopped renewing its lease on attempt {attempts} of {max_attempts}"
        if attempts >= max_attempts:
            message = f"{what} (it crashed, was stopped or lost the server); no attempts are left"
            values = {
                "status": TaskStatus.FAILED,
                "error": message,
                "finished_at": now,
                "lease_expires_at": None,
            }
        else:
            values = {
                "status": TaskStatus.QUEUED,
                "error": f"{what}; back in the queue",
                "lease_owner": None,
                "lease_expires_at": None,
            }
        result = session.execute(
            update(AgentTask)
            .where(
                AgentTask.id == task_id,
                AgentTask.status == TaskStatus.LEASED,
                AgentTask.lease_owner == owner,
                AgentTask.lease_expires_at < now,
            )
            .values(updated_at=now, **values)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            changed += 1
            logger.warning("agent task %d: %s", task_id, values["error"])
            if values["status"] == TaskStatus.FAILED and kind == TaskKind.PROFILE_CAMPAIGN:
                _campaign_failed(session, device_id, task_id, values["error"])
    return changed


def lease_task(
    session: Session, device: Device, agent_id: str, lease_seconds: float, now: datetime | None = None
) -> tuple[AgentTask, bool] | None:
    """Lease the device's next task for `agent_id` (the caller commits).

    Lapsed leases are reclaimed first. An agent that holds an unexpired lease gets that task back
    (renewed); otherwise it takes the oldest queued task, which counts an attempt.

    Returns:
        The task and whether the agent held it already; None when there is nothing to do.
    """
    now = now or utcnow()
    reclaim_lapsed(session, device.id, now)
    expires = now + timedelta(seconds=lease_seconds)
    own = session.scalars(
        select(AgentTask)
        .where(
            AgentTask.device_id == device.id,
            AgentTask.status == TaskStatus.LEASED,
            AgentTask.lease_owner == agent_id,
            AgentTask.lease_expires_at >= now,
        )
        .order_by(AgentTask.id)
        .limit(1)
    ).first()
    if own is not None:
        own.lease_expires_at = expires
        own.updated_at = now
        session.flush()
        logger.info("agent %s resumes task %d (%s)", agent_id, own.id, own.kind)
        return own, True
    values = {
        "status": TaskStatus.LEASED,
        "lease_owner": agent_id,
        "lease_expires_at": expires,
        "attempts": AgentTask.attempts + 1,
        "updated_at": now,
    }
    if session.get_bind().dialect.name == "postgresql":
        task_id = _claim_postgres(session, device.id, values)
    else:
        task_id = _claim_conditional(session, device.id, values)
    if task_id is None:
        return None
    task = session.get(AgentTask, task_id, populate_existing=True)
    assert task is not None
    if task.started_at is None:  # the first lease; later ones keep it
        task.started_at = now
        session.flush()
    logger.info("agent %s leased task %d (%s), attempt %d", agent_id, task.id, task.kind, task.attempts)
    return task, False


def _queued(device_id: int) -> ColumnElement[bool]:
    return and_(AgentTask.device_id == device_id, AgentTask.status == TaskStatus.QUEUED)


def _claim_postgres(session: Session, device_id: int, values: dict[str, Any]) -> int | None:
    # The row lock is held until commit; other agents' SKIP LOCKED passes over it meanwhile.
    task_id = session.scalars(
        select(AgentTask.id)
        .where(_queued(device_id))
        .order_by(AgentTask.created_at, AgentTask.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    if task_id is None:
        return None
    session.execute(update(AgentTask).where(AgentTask.id == task_id).values(**values))
    return task_id


def _claim_conditional(session: Session, device_id: int, values: dict[str, Any]) -> int | None:
    # One writer at a time: the UPDATE re-checks that the task is still queued, so of two agents that
    # saw the same candidate only one changes the row; the other moves on to the next candidate.
    candidates = session.scalars(
        select(AgentTask.id).where(_queued(device_id)).order_by(AgentTask.created_at, AgentTask.id).limit(8)
    ).all()
    for task_id in candidates:
        result = session.execute(
            update(AgentTask).where(AgentTask.id == task_id, _queued(device_id)).values(**values)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return task_id
    return None


def _require_holder(task: AgentTask, agent_id: str, action: str) -> None:
    """Raise unless `agent_id` holds the task's lease."""
    if task.status == TaskStatus.LEASED and task.lease_owner == agent_id:
        return
    details = {
        "task_id": task.id,
        "status": task.status,
        "lease_owner": task.lease_owner,
        "agent_id": agent_id,
    }
    if task.status in FINISHED_STATUSES:
        raise TaskFinished(f"cannot {action} task {task.id}: it is {task.status} already", details)
    if task.status == TaskStatus.LEASED:
        raise LeaseLost(
            f"cannot {action} task {task.id}: it is leased by agent {task.lease_owner}, not {agent_id} "
            "(a lapsed lease is handed to the next agent); drop it and lease again",
            details,
        )
    raise LeaseLost(
        f"cannot {action} task {task.id}: agent {agent_id} does not hold its lease (it is queued); lease again",
        details,
    )


def _held_by(task: AgentTask, agent_id: str) -> ColumnElement[bool]:
    return and_(
        AgentTask.id == task.id, AgentTask.status == TaskStatus.LEASED, AgentTask.lease_owner == agent_id
    )


def heartbeat_task(
    session: Session,
    task: AgentTask,
    agent_id: str,
    lease_seconds: float,
    progress: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AgentTask:
    """Renew the lease and store the progress (the caller commits).

    Raises:
        LeaseLost, TaskFinished: `agent_id` does not hold the lease.
    """
    now = now or utcnow()
    _require_holder(task, agent_id, "renew the lease of")
    values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(update(AgentTask).where(_held_by(task, agent_id)).values(**values))
    session.refresh(task)
    if result.rowcount != 1:  # type: ignore[attr-defined]
        _require_holder(task, agent_id, "renew the lease of")
    if progress is not None and task.kind == TaskKind.PROFILE_CAMPAIGN:
        _campaign_progress(task, progress, now)
    return task


def _campaign_progress(task: AgentTask, progress: dict[str, Any], now: datetime) -> None:
    """Show a campaign's progress as its device's status (profiling, percent, ETA)."""
    percent = progress.get("percent")
    eta = progress.get("eta_seconds")
    measured = progress.get("measured")
    task.device.status = {
        "phase": "profiling",
        "percent": round(min(100.0, max(0.0, float(percent))), 1)
        if isinstance(percent, int | float)
        else None,
        "eta_seconds": round(max(0.0, float(eta)), 1) if isinstance(eta, int | float) else None,
        "message": f"agent campaign {task.id}: {measured} measurement(s)"
        if isinstance(measured, int)
        else f"agent campaign {task.id}",
        "job_id": None,
        "updated_at": now.isoformat(),
    }


def _campaign_failed(session: Session, device_id: int, task_id: int, error: str) -> None:
    device = session.get(Device, device_id)
    if device is not None:
        device.status = {
            "phase": "failed",
            "message": f"profile campaign {task_id} failed: {error}"[:MAX_ERROR_CHARS],
            "updated_at": utcnow().isoformat(),
        }


def _checked_result(task: AgentTask, result: dict[str, Any]) -> dict[str, Any]:
    """The result validated for the task's kind, as stored."""
    model: type[BaseModel] = VerifyResult if task.kind == TaskKind.VERIFY else CampaignResult
    try:
        checked = model.model_validate(result)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(result)", "message": err["msg"]}
            for err in exc.errors(include_url=False)
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise InvalidInput(f"invalid result for a {task.kind} task: {summary}", {"errors": errors}) from None
    if isinstance(checked, VerifyResult) and checked.network_hash != task.payload.get("network_hash"):
        raise InvalidInput(
            f"the result is for network {checked.network_hash[:12]}, but task {task.id} asked to measure "
            f"{str(task.payload.get('network_hash'))[:12]}",
            {"expected": task.payload.get("network_hash"), "got": checked.network_hash},
        )
    return checked.model_dump(mode="json")


def _digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def complete_task(
    session: Session, task: AgentTask, agent_id: str, result: dict[str, Any], settings: Settings
) -> tuple[AgentTask, bool]:
    """Mark the task succeeded with the agent's result (the caller commits).

    A repeated completion by the same agent with the same result is a replay: nothing changes. A task
    whose lapsed lease went back to the queue, and that nobody leased since, still takes the result:
    the work is done. A campaign with ``fit_after`` queues a fit of its device.

    Returns:
        The task and whether this was a replay.

    Raises:
        InvalidInput: A result that does not fit the task's kind.
        LeaseLost: Another agent holds the task now.
        TaskFinished: The task failed or was cancelled, or succeeded with another result or agent.
    """
    checked = _checked_result(task, result)
    digest = _digest(checked)
    if task.status == TaskStatus.SUCCEEDED and task.lease_owner == agent_id and task.result_digest == digest:
        return task, True
    if task.status == TaskStatus.SUCCEEDED:
        raise TaskFinished(
            f"task {task.id} succeeded already with another result (completed by agent {task.lease_owner})",
            {"task_id": task.id, "status": task.status, "lease_owner": task.lease_owner},
        )
    if task.status != TaskStatus.QUEUED:
        _require_holder(task, agent_id, "complete")
    now = utcnow()
    condition = (
        _held_by(task, agent_id)
        if task.status == TaskStatus.LEASED
        else and_(AgentTask.id == task.id, AgentTask.status == TaskStatus.QUEUED)
    )
    changed = session.execute(
        update(AgentTask)
        .where(condition)
        .values(
            status=TaskStatus.SUCCEEDED,
            result=checked,
            result_digest=digest,
            lease_owner=agent_id,
            lease_expires_at=None,
            error=None,
            finished_at=now,
            updated_at=now,
        )
    )
    session.refresh(task)
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        _require_holder(task, agent_id, "complete")  # someone else moved it meanwhile
    logger.info("agent %s completed task %d (%s)", agent_id, task.id, task.kind)
    wake_plan(session, task)
    if task.kind == TaskKind.PROFILE_CAMPAIGN:
        task.device.status = None  # its counts say what it has now
        if task.payload.get("fit_after"):
            task.result = {**checked, "fit": _queue_fit(session, task.device, settings)}
    session.flush()
    return task, False


def _queue_fit(session: Session, device: Device, settings: Settings) -> dict[str, Any]:
    """Queue a fit after a campaign; a refusal (too few networks, a fit on the way) is reported, not raised."""
    from service.predictors import request_fit

    try:
        with session.begin_nested():
            job = request_fit(session, device, settings.worker.max_attempts, settings.fit)
    except (LpnetError, ServiceError) as exc:
        logger.info("no fit after the campaign of device %s: %s", device.name, exc)
        return {"queued": False, "reason": getattr(exc, "message", str(exc)), **_job_detail(exc)}
    logger.info("queued fit job %d after the campaign of device %s", job.id, device.name)
    return {"queued": True, "job_id": job.id}


def _job_detail(exc: Exception) -> dict[str, Any]:
    details = getattr(exc, "details", {}) or {}
    return {"job_id": details["job_id"]} if "job_id" in details else {}


def fail_task(
    session: Session, task: AgentTask, agent_id: str, error: str, *, retry: bool = False
) -> AgentTask:
    """Record that the agent could not do the task: back to the queue if `retry` and attempts are left,
    else failed for good (the caller commits).

    Raises:
        LeaseLost, TaskFinished: `agent_id` does not hold the lease.
    """
    _require_holder(task, agent_id, "fail")
    now = utcnow()
    error = error.replace("\x00", "")[:MAX_ERROR_CHARS]
    requeue = retry and task.attempts < task.max_attempts
    values: dict[str, Any] = {"error": error, "lease_expires_at": None, "updated_at": now}
    if requeue:
        values.update(status=TaskStatus.QUEUED, lease_owner=None)
    else:
        values.update(status=TaskStatus.FAILED, finished_at=now)
    changed = session.execute(update(AgentTask).where(_held_by(task, agent_id)).values(**values))
    session.refresh(task)
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        _require_holder(task, agent_id, "fail")
    logger.warning(
        "agent %s failed task %d (%s): %s", agent_id, task.id, "requeued" if requeue else "final", error
    )
    if not requeue:
        wake_plan(session, task)
    if not requeue and task.kind == TaskKind.PROFILE_CAMPAIGN:
        _campaign_failed(session, task.device_id, task.id, error)
    return task


def cancel_task(factory: sessionmaker[Session], task_id: int, reason: str) -> bool:
    """Cancel a queued or leased task in a transaction of its own; False when it had finished already."""
    now = utcnow()
    with factory() as session:
        result = session.execute(
            update(AgentTask)
            .where(AgentTask.id == task_id, AgentTask.status.in_(OPEN_STATUSES))
            .values(
                status=TaskStatus.CANCELLED,
                error=reason,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        )
        session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


# Plan verification through the agent ------------------------------------------------------------------


def verify_protocol(settings: AgentSettings) -> TimingProtocol:
    """The timing protocol agents verify plans with."""
    from profiler.protocol import TimingProtocol

    return TimingProtocol.quick() if settings.verify_protocol == "quick" else TimingProtocol()


@dataclass(frozen=True)
class VerifyTaskState:
    """Where a verify task stands, read in one transaction."""

    id: int
    status: TaskStatus
    result: dict[str, Any] | None
    error: str | None
    lease_owner: str | None
    created_at: datetime


def verify_task_for(
    factory: sessionmaker[Session],
    job_id: int,
    device_id: int,
    network: Network,
    protocol: TimingProtocol,
    max_attempts: int,
) -> VerifyTaskState:
    """The plan job's verify task for `network` (by its content hash), queued now if it has none.

    Of the job's tasks for the network a succeeded one comes first (a resumed or retried plan reuses the
    measurement), then an open one, then the newest failed or cancelled one: the plan fails on it
    rather than asking again.
    """
    network_hash = network.content_hash
    with factory() as session:
        tasks = [
            task
            for task in session.scalars(
                select(AgentTask)
                .where(AgentTask.job_id == job_id, AgentTask.kind == TaskKind.VERIFY)
                .order_by(AgentTask.id.desc())
            )
            if task.payload.get("network_hash") == network_hash
        ]
        for wanted in ((TaskStatus.SUCCEEDED,), OPEN_STATUSES, FINISHED_STATUSES):
            task = next((t for t in tasks if t.status in wanted), None)
            if task is not None:
                return _verify_state(task)
        task = AgentTask(
            device_id=device_id,
            kind=TaskKind.VERIFY,
            job_id=job_id,
            payload={
                "architecture": network.model_dump(mode="json"),
                "network_hash": network_hash,
                "protocol": protocol.model_dump(mode="json"),
            },
            max_attempts=max_attempts,
        )
        session.add(task)
        session.commit()
        logger.info("plan %d: queued verify task %d for network %s", job_id, task.id, network_hash[:12])
        return _verify_state(task)


def _verify_state(task: AgentTask) -> VerifyTaskState:
    return VerifyTaskState(
        id=task.id,
        status=TaskStatus(task.status),
        result=dict(task.result) if task.result is not None else None,
        error=task.error,
        lease_owner=task.lease_owner,
        created_at=task.created_at,
    )


def cancel_verify_tasks(
    factory: sessionmaker[Session], job_id: int, reason: str, keep: Collection[int] = ()
) -> int:
    """Cancel the plan job's open verify tasks, except those in `keep`, in a transaction of their own.

    Returns:
        How many were cancelled.
    """
    now = utcnow()
    with factory() as session:
        result = session.execute(
            update(AgentTask)
            .where(
                AgentTask.job_id == job_id,
                AgentTask.kind == TaskKind.VERIFY,
                AgentTask.status.in_(OPEN_STATUSES),
                AgentTask.id.not_in(list(keep)),
            )
            .values(
                status=TaskStatus.CANCELLED,
                error=reason[:MAX_ERROR_CHARS],
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        )
        session.commit()
    cancelled = int(result.rowcount)  # type: ignore[attr-defined]
    if cancelled:
        logger.info("plan %d: cancelled %d verify task(s): %s", job_id, cancelled, reason)
    return cancelled


def wake_plan(session: Session, task: AgentTask) -> None:
    """Resume the deferred plan job that waits for verify task `task` at once (the caller commits)."""
    if task.kind == TaskKind.VERIFY and task.job_id is not None and wake_job(session, task.job_id):
        logger.info("task %d finished: plan %d resumes", task.id, task.job_id)


def recheck_seconds(waited_seconds: float, timeout_seconds: float) -> float:
    """When a plan that has waited `waited_seconds` for a verify task looks at it again: later the longer
    it waited, and no later than the verify timeout."""
    delay = min(max(VERIFY_RECHECK_MIN_SECONDS, waited_seconds / 4), VERIFY_RECHECK_MAX_SECONDS)
    return min(delay, max(0.0, timeout_seconds - waited_seconds))


def verify_measurement(result: dict[str, Any], nominal_probe_ms: float | None) -> MeasuredLatency:
    """An agent's verify result as a verification measurement.

    Judged at `nominal_probe_ms` when the agent timed it against the current speed probe (the speed
    the device's predictor was fitted at), else on the raw median.
    """
    from lpnet.gates.result import MeasuredLatency
    from profiler.speed import PROBE_VERSION

    raw = float(result["measured_ms"])
    probe_ms, relative = result.get("probe_ms"), result.get("relative_latency")
    if probe_ms is None or relative is None or result.get("probe_version") != PROBE_VERSION:
        return MeasuredLatency(raw, raw)
    return MeasuredLatency.at_speed(raw, float(relative), float(probe_ms), nominal_probe_ms)


def remote_measure(
    context: JobContext, device: Device, settings: AgentSettings, nominal_probe_ms: float | None = None
) -> MeasureFn:
    """A `measure` for the planner that has the remote device's agent measure each network.

    No worker thread waits for the agent: a network the agent has not measured yet gets a verify task
    (one per job and network) and the plan job is deferred (`service.jobs.queue.Deferred`), showing
    progress phase ``waiting_for_agent``. Resumed, the plan plans again from the start and this measure
    answers at once for every network measured so far, up to the one still waiting. A replay that plans
    another network than before (the planner need not repeat itself exactly) asks for that network, and
    the tasks no longer needed are cancelled. A task still open `settings.verify_timeout_seconds` after it
    was queued is cancelled and the plan fails. With `nominal_probe_ms` the agent's probed timings are
    judged at that speed (`verify_measurement`).

    Raises (from the returned function):
        Deferred: The agent has not measured the network yet.
        AgentTaskFailed: The agent failed the task, or it was cancelled.
        AgentTimeout: Nobody measured it within the verify timeout.
    """
    protocol = verify_protocol(settings)
    rounds = itertools.count(1)
    used: set[int] = set()
    device_id, device_name = device.id, device.name
    timeout = settings.verify_timeout_seconds

    def measure(network: Network) -> MeasuredLatency:
        context.check()
        round_number = next(rounds)
        while True:
            task = verify_task_for(
                context.factory, context.job.id, device_id, network, protocol, settings.max_attempts
            )
            used.add(task.id)
            if task.status == TaskStatus.SUCCEEDED and task.result is not None:
                return verify_measurement(task.result, nominal_probe_ms)
            if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                raise AgentTaskFailed(
                    f"the agent of device {device_name!r} did not measure the pruned network of round "
                    f"{round_number} (verify task {task.id} {task.status}): {task.error}",
                    {"task_id": task.id, "status": task.status},
                )
            waited = (utcnow() - task.created_at).total_seconds()
            if waited < timeout:
                break
            reason = f"the plan stopped waiting after {timeout:g} s"
            if cancel_task(context.factory, task.id, reason):
                holder = (
                    f"leased by agent {task.lease_owner}"
                    if task.status == TaskStatus.LEASED
                    else "never leased by an agent"
                )
                raise AgentTimeout(
                    f"no agent of device {device_name!r} measured the pruned network within {timeout:g} s "
                    f"(verify task {task.id} was {holder}); start `lpnet agent` for the device, raise "
                    "LPNET_AGENT__VERIFY_TIMEOUT_SECONDS, or plan without verify",
                    {"task_id": task.id, "timeout_seconds": timeout},
                )
            # It finished at the last moment: read it again.
        cancel_verify_tasks(
            context.factory, context.job.id, "the resumed plan measures another network instead", keep=used
        )
        raise Deferred(
            recheck_seconds(waited, timeout),
            WAITING_FOR_AGENT,
            f"round {round_number}: waiting for the agent of {device_name!r} to measure the pruned network "
            f"(verify task {task.id}, {task.status}, queued {waited:.0f} s ago)",
        )

    return measure
