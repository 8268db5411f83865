"""Device agents: hello, lease, heartbeat, complete and fail tasks; admins queue campaigns and list tasks.

An agent key works for its own device; an admin key may act for any device (it names the device).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from service.agents.access import device_for_key, task_for_key
from service.agents.tasks import (
    agent_hello,
    complete_task,
    describe_task,
    device_sample_keys,
    fail_task,
    heartbeat_task,
    lease_task,
    list_device_tasks,
    queue_campaign,
)
from service.api.deps import AdminKey, AgentKey, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.api.pagination import PageQuery
from service.api.routes.devices import DevicePath
from service.api.routes.profiles import REPLAY_HEADER
from service.db.models import TaskKind, TaskStatus
from service.devices import resolve_device
from service.schemas.agent import (
    AgentHello,
    AgentHelloRead,
    AgentTaskRead,
    CampaignCreate,
    SampleKeysRead,
    TaskComplete,
    TaskFail,
    TaskHeartbeat,
    TaskLeaseRequest,
)
from service.schemas.common import MAX_ID, Page

router = APIRouter(prefix="/v1/agent", tags=["agent"], responses=error_responses(400, 401, 403, 404, 422))
devices_router = APIRouter(
    prefix="/v1/devices", tags=["agent"], responses=error_responses(400, 401, 403, 422)
)

TaskId = Annotated[int, Path(ge=1, le=MAX_ID, description="The agent task's id.")]


@router.post("/hello", summary="An agent announces itself")
def hello(body: AgentHello, session: SessionDep, settings: SettingsDep, key: AgentKey) -> AgentHelloRead:
    """Store the agent's machine fingerprint on its device and tell it the settings to measure with.

    With `profile_minutes`, a device without predictor, open campaign or fit on the way gets a
    campaign of that many minutes queued, with a fit after it.
    """
    device = device_for_key(session, key, body.device)
    answer = agent_hello(session, device, body, key, settings)
    session.commit()
    return answer


@router.post(
    "/tasks/lease",
    summary="Lease the device's next task",
    response_model=AgentTaskRead,
    responses={204: {"description": "Nothing to do: ask again later."}},
)
def lease(
    body: TaskLeaseRequest, session: SessionDep, settings: SettingsDep, key: AgentKey
) -> Response | AgentTaskRead:
    """The oldest queued task of the device, leased to `agent_id`, or 204 when there is none.

    An agent that still holds an unexpired lease gets that task back (`resumed`): restart and continue.
    """
    device = device_for_key(session, key, body.device)
    leased = lease_task(session, device, body.agent_id, body.lease_seconds or settings.agent.lease_seconds)
    session.commit()
    if leased is None:
        return Response(status_code=204)
    task, resumed = leased
    return describe_task(task, resumed=resumed)


@router.post("/tasks/{task_id}/heartbeat", summary="Renew a task's lease", responses=error_responses(409))
def heartbeat(
    task_id: TaskId, body: TaskHeartbeat, session: SessionDep, settings: SettingsDep, key: AgentKey
) -> AgentTaskRead:
    """Extend the lease and store the progress; 409 when the agent no longer holds the lease."""
    task = task_for_key(session, key, task_id)
    lease_seconds = body.lease_seconds or settings.agent.lease_seconds
    task = heartbeat_task(session, task, body.agent_id, lease_seconds, body.progress)
    session.commit()
    return describe_task(task)


@router.post("/tasks/{task_id}/complete", summary="Complete a task", responses=error_responses(409))
def complete(
    task_id: TaskId,
    body: TaskComplete,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    key: AgentKey,
) -> AgentTaskRead:
    """Store the task's result. Sending the same result again is answered unchanged, with
    `Idempotency-Replayed: true`; 409 when another agent holds the task or it finished otherwise."""
    task = task_for_key(session, key, task_id)
    task, replayed = complete_task(session, task, body.agent_id, body.result, settings)
    session.commit()
    if replayed:
        response.headers[REPLAY_HEADER] = "true"
    return describe_task(task)


@router.post("/tasks/{task_id}/fail", summary="Fail a task", responses=error_responses(409))
def fail(task_id: TaskId, body: TaskFail, session: SessionDep, key: AgentKey) -> AgentTaskRead:
    """Record why the agent could not do the task; with `retry`, it goes back to the queue while
    attempts are left."""
    task = task_for_key(session, key, task_id)
    task = fail_task(session, task, body.agent_id, body.error, retry=body.retry)
    session.commit()
    return describe_task(task)


@router.get("/sample-keys", summary="Sample keys the device has")
def sample_keys(
    session: SessionDep,
    key: AgentKey,
    device: Annotated[
        str | None, Query(min_length=1, max_length=128, description="Needed with an admin key: id or name.")
    ] = None,
) -> SampleKeysRead:
    """Keys of the device's stored network and isolated-layer measurements: an agent skips them."""
    target = device_for_key(session, key, device)
    return SampleKeysRead(device_id=target.id, sample_keys=device_sample_keys(session, target.id))


@devices_router.post(
    "/{device}/campaigns",
    status_code=202,
    summary="Queue a profile campaign for a device's agent",
    responses=error_responses(404, 413),
)
def create_campaign(
    device: DevicePath, spec: CampaignCreate, session: SessionDep, settings: SettingsDep, _key: AdminKey
) -> AgentTaskRead:
    """Queue a campaign that the device's agent (`lpnet agent`) leases, measures and posts; with
    `fit_after`, a fit job follows its success."""
    task = queue_campaign(session, resolve_device(session, device), spec, settings.agent.max_attempts)
    session.commit()
    return describe_task(task)


@devices_router.get("/{device}/tasks", summary="List a device's agent tasks", responses=error_responses(404))
def get_device_tasks(
    device: DevicePath,
    session: SessionDep,
    _key: ReaderKey,
    page: PageQuery,
    status: TaskStatus | None = None,
    kind: TaskKind | None = None,
) -> Page[AgentTaskRead]:
    """The device's campaigns and verifications, newest first, with status, progress and lease, a page
    at a time."""
    tasks = list_device_tasks(session, resolve_device(session, device), page, status=status, kind=kind)
    return Page[AgentTaskRead](
        items=[describe_task(task) for task in tasks.rows], next_cursor=tasks.next_cursor
    )
