"""Pruning plans: request one for a latency budget, then poll it for the result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.deps import LatencyDep, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.jobs.queue import job_accepted
from service.plans import describe_plan, get_plan, request_plan
from service.schemas.common import MAX_ID
from service.schemas.jobs import JobAccepted
from service.schemas.plans import PlanCreate, PlanRead

router = APIRouter(prefix="/v1/plans", tags=["plans"], responses=error_responses(400, 401, 403, 422))


@router.post(
    "",
    status_code=202,
    summary="Request a pruning plan for a latency budget",
    responses=error_responses(404, 409, 413, 422),
)
def create_plan(
    spec: PlanCreate, session: SessionDep, latency: LatencyDep, settings: SettingsDep, _key: ReaderKey
) -> JobAccepted:
    """Queue a plan: per-layer pruning ratios so the architecture meets `budget_ms` on the device.

    Checked before queuing: the device (404), its predictor (409), the options, and that the budget
    is reachable at all (422 naming the least achievable latency).
    """
    job = request_plan(session, latency, spec, settings.worker.max_attempts)
    session.commit()
    return job_accepted(job, "/v1/plans")


@router.get("/{plan_id}", summary="Show a plan", responses=error_responses(404, 422))
def get_plan_route(
    plan_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _key: ReaderKey
) -> PlanRead:
    """The plan's status; once succeeded its result (widths, per-layer ratios, latencies), or its error."""
    return describe_plan(get_plan(session, plan_id))
