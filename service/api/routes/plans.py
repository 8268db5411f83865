"""Pruning plans: request one for a latency budget, then poll it for the result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.deps import LatencyDep, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.api.json_body import json_body, json_body_openapi
from service.jobs.queue import job_accepted
from service.plans import describe_plan, get_plan, request_plan
from service.schemas.common import MAX_ID
from service.schemas.jobs import JobAccepted
from service.schemas.plans import PlanCreate, PlanRead

router = APIRouter(prefix="/v1/plans", tags=["plans"], responses=error_responses(400, 401, 403, 422))

# An architecture of up to megabytes, parsed and validated in the thread pool (`service.api.json_body`).
PlanBody = Annotated[PlanCreate, json_body(PlanCreate)]


@router.post(
    "",
    status_code=202,
    summary="Request a pruning plan for a latency budget",
    responses=error_responses(404, 409, 413, 422, 429),
    openapi_extra=json_body_openapi(PlanCreate),
)
def create_plan(
    spec: PlanBody, session: SessionDep, latency: LatencyDep, settings: SettingsDep, key: ReaderKey
) -> JobAccepted:
    """Queue a plan: per-layer pruning ratios so the architecture meets `budget_ms` on the device.

    Checked before queuing: the key's quota (429 with Retry-After: a reader key may have
    LPNET_QUOTA__ACTIVE_PLANS plans queued or running and request LPNET_QUOTA__PLANS_PER_HOUR an hour;
    admin keys are exempt), `verify` on a local device (403 without an admin key), the device (404),
    its predictor (409), the options, and that the budget is reachable at all (422 naming the least
    achievable latency).
    """
    job = request_plan(session, latency, spec, key, settings)
    session.commit()
    return job_accepted(job, "/v1/plans")


@router.get("/{plan_id}", summary="Show a plan", responses=error_responses(404, 422))
def get_plan_route(
    plan_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _key: ReaderKey
) -> PlanRead:
    """The plan's status; once succeeded its result (widths, per-layer ratios, latencies), or its error."""
    return describe_plan(get_plan(session, plan_id))
