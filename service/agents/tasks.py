"""Tasks for the agents of remote devices: profile campaigns and verify tasks, leased by agents.

An agent leases the oldest queued task of its device through the one lease path of
`service.jobs.queue` (`AGENT_TASKS`); heartbeats renew the lease. A lease that lapsed (its agent died or
lost the server) is ended lazily, the next time an agent of the device asks for work: the task goes back
to the queue, or fails with the reason once `max_attempts` leases were spent. An agent that restarts
with the same agent id gets its own unexpired task back and continues it. Completing is idempotent: the
same agent sending the same result again changes nothing. Completing or failing a verify task wakes the
plan job waiting for it (`service.agents.verify`); a campaign shows its progress as its device's status,
and one with ``fit_after`` queues a fit once it succeeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from lpnet.errors import LpnetError
from profiler.coverage import SYNTHETIC_FAMILIES
from profiler.family_names import GENERATED_FAMILY, TRANSFORMER_FAMILY, describe_special_families
from service.config import Settings
from service.db.base import utcnow
from service.db.models import (
    AgentTask,
    ApiKey,
    Device,
    LayerMeasurement,
    MeasurementContext,
    NetworkMeasurement,
    TaskKind,
    TaskStatus,
)
from service.devices import latest_predictor
from service.errors import Conflict, InvalidInput, ServiceError
from service.jobs.context import LeaseLost
from service.jobs.kinds import JobKind
from service.jobs.queue import (
    AGENT_TASKS,
    LapsedLease,
    active_job,
    claim_row,
    clip_error,
    completion_values,
    end_lapsed_leases,
    failure_values,
    held_by,
    lease_values,
    renewal_values,
    update_held,
    wake_job,
)
from service.pagination import Keyset, Page, PageRequest, paginate
from service.predictors import request_fit
from service.schemas.agent import (
    AgentDeviceRead,
    AgentHello,
    AgentHelloRead,
    AgentTaskRead,
    CampaignCreate,
    CampaignResult,
    HeartbeatProgress,
    VerifyResult,
)

logger = logging.getLogger(__name__)

OPEN_STATUSES = (TaskStatus.QUEUED, TaskStatus.LEASED)
FINISHED_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class TaskFinished(Conflict):
    """The task succeeded, failed or was cancelled already."""

    code = "task_finished"


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


TASK_LIST = Keyset("device_tasks", AgentTask.id, descending=True)


def list_device_tasks(
    session: Session,
    device: Device,
    page: PageRequest,
    *,
    status: TaskStatus | None = None,
    kind: TaskKind | None = None,
) -> Page[AgentTask]:
    """A page of the device's tasks, newest first."""
    query = select(AgentTask).where(AgentTask.device_id == device.id)
    if status is not None:
        query = query.where(AgentTask.status == status)
    if kind is not None:
        query = query.where(AgentTask.kind == kind)
    filters = {"device": device.id, "status": status, "kind": kind}
    return paginate(session, query, TASK_LIST, page, filters)


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
    """Refuse names that are neither torchvision classification models nor the special families
    (op_coverage, wide_dense, generated, generated_transformer).

    Raises:
        InvalidInput: Naming the unknown families and the known ones.
    """
    # Imported here: torchvision takes seconds to import, and only queueing a campaign needs it.
    import torchvision

    known = set(torchvision.models.list_models(module=torchvision.models))
    special = {*SYNTHETIC_FAMILIES, GENERATED_FAMILY, TRANSFORMER_FAMILY}
    unknown = [name for name in families if name not in known and name not in special]
    if unknown:
        raise InvalidInput(
            f"unknown model families {unknown}; families are {describe_special_families(last='or')}, "
            f"or torchvision classification models: {', '.join(sorted(known))}",
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
    device.environment = hello.environment.model_dump(mode="json")
    campaign = open_campaign(session, device.id)
    has_predictor = latest_predictor(session, device) is not None
    queued = False
    if (
        hello.profile_minutes is not None
        and campaign is None
        and not has_predictor
        and active_job(session, JobKind.FIT, device.id) is None
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


def _lapsed_message(lapsed: LapsedLease) -> str:
    what = f"agent {lapsed.owner} stopped renewing its lease on attempt {lapsed.attempts} of {lapsed.max_attempts}"
    if lapsed.failed:
        return f"{what} (it crashed, was stopped or lost the server); no attempts are left"
    return f"{what}; back in the queue"


def reclaim_lapsed(session: Session, device_id: int, now: datetime | None = None) -> int:
    """Requeue the device's tasks whose lease lapsed, or fail those without attempts left (caller commits).

    Returns:
        How many tasks changed.
    """
    ended = end_lapsed_leases(
        session,
        AGENT_TASKS,
        _lapsed_message,
        now or utcnow(),
        requeue=True,
        scope=AgentTask.device_id == device_id,
    )
    for lapsed in ended:
        if lapsed.failed and lapsed.kind == TaskKind.PROFILE_CAMPAIGN:
            _campaign_failed(session, device_id, lapsed.id, lapsed.error)
    return len(ended)


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
        update_held(session, AGENT_TASKS, own.id, agent_id, renewal_values(lease_seconds, now))
        session.refresh(own)
        logger.info("agent %s resumes task %d (%s)", agent_id, own.id, own.kind)
        return own, True
    queued = and_(AgentTask.device_id == device.id, AgentTask.status == TaskStatus.QUEUED)
    task_id = claim_row(session, AGENT_TASKS, queued, lease_values(AGENT_TASKS, agent_id, lease_seconds, now))
    if task_id is None:
        return None
    task = session.get(AgentTask, task_id, populate_existing=True)
    assert task is not None
    if task.started_at is None:  # the first lease; later ones keep it
        task.started_at = now
        session.flush()
    logger.info("agent %s leased task %d (%s), attempt %d", agent_id, task.id, task.kind, task.attempts)
    return task, False


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
    return held_by(AGENT_TASKS, task.id, agent_id)


def heartbeat_task(
    session: Session,
    task: AgentTask,
    agent_id: str,
    lease_seconds: float,
    progress: HeartbeatProgress | None = None,
    now: datetime | None = None,
) -> AgentTask:
    """Renew the lease and store the progress (the caller commits).

    Raises:
        LeaseLost, TaskFinished: `agent_id` does not hold the lease.
    """
    now = now or utcnow()
    _require_holder(task, agent_id, "renew the lease of")
    stored = None if progress is None else progress.as_json()
    held = update_held(session, AGENT_TASKS, task.id, agent_id, renewal_values(lease_seconds, now, stored))
    session.refresh(task)
    if not held:
        _require_holder(task, agent_id, "renew the lease of")
    if progress is not None and task.kind == TaskKind.PROFILE_CAMPAIGN:
        _campaign_progress(task, progress, now)
    return task


def _campaign_progress(task: AgentTask, progress: HeartbeatProgress, now: datetime) -> None:
    """Show a campaign's progress as its device's status (profiling, percent, ETA)."""
    percent, eta, measured = progress.percent, progress.eta_seconds, progress.measured
    task.device.status = {
        "phase": "profiling",
        "percent": None if percent is None else round(percent, 1),
        "eta_seconds": None if eta is None else round(eta, 1),
        "message": f"agent campaign {task.id}"
        if measured is None
        else f"agent campaign {task.id}: {measured} measurement(s)",
        "job_id": None,
        "updated_at": now.isoformat(),
    }


def _campaign_failed(session: Session, device_id: int, task_id: int, error: str) -> None:
    device = session.get(Device, device_id)
    if device is not None:
        device.status = {
            "phase": "failed",
            "message": clip_error(f"profile campaign {task_id} failed: {error}"),
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
    values = completion_values(AGENT_TASKS, now)
    values.update(result=checked, result_digest=digest, lease_owner=agent_id)
    changed = session.execute(update(AgentTask).where(condition).values(**values))
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
    requeue = retry and task.attempts < task.max_attempts
    values = failure_values(AGENT_TASKS, error, utcnow(), requeue=requeue)
    held = update_held(session, AGENT_TASKS, task.id, agent_id, values)
    session.refresh(task)
    if not held:
        _require_holder(task, agent_id, "fail")
    error = task.error or ""
    logger.warning(
        "agent %s failed task %d (%s): %s", agent_id, task.id, "requeued" if requeue else "final", error
    )
    if not requeue:
        wake_plan(session, task)
    if not requeue and task.kind == TaskKind.PROFILE_CAMPAIGN:
        _campaign_failed(session, task.device_id, task.id, error)
    return task


def cancel_tasks(factory: sessionmaker[Session], where: ColumnElement[bool], reason: str) -> int:
    """Cancel the queued or leased tasks that match `where`, in a transaction of their own.

    Returns:
        How many were cancelled (those finished already are left as they are).
    """
    now = utcnow()
    with factory() as session:
        result = session.execute(
            update(AgentTask)
            .where(where, AgentTask.status.in_(OPEN_STATUSES))
            .values(
                status=TaskStatus.CANCELLED,
                error=clip_error(reason),
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        )
        session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


def cancel_task(factory: sessionmaker[Session], task_id: int, reason: str) -> bool:
    """Cancel a queued or leased task; False when it had finished already."""
    return cancel_tasks(factory, AgentTask.id == task_id, reason) == 1


def wake_plan(session: Session, task: AgentTask) -> None:
    """Resume the deferred plan job that waits for verify task `task` at once (the caller commits)."""
    if task.kind == TaskKind.VERIFY and task.job_id is not None and wake_job(session, task.job_id):
        logger.info("task %d finished: plan %d resumes", task.id, task.job_id)
