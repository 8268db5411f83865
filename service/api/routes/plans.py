"""Pruning plans: request one for a latency budget, then poll it for the result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from service.api.deps import LatencyDep, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.api.json_body import json_body, json_body_openapi
from service.jobs.queue import job_accepted
from service.plans import describe_plan, get_plan, plan_model_bytes, request_plan
from service.schemas.common import MAX_ID
from service.schemas.jobs import JobAccepted
from service.schemas.plans import PLAN_MODEL_MEDIA_TYPES, PlanCreate, PlanModelFormat, PlanRead

router = APIRouter(prefix="/v1/plans", tags=["plans"], responses=error_responses(400, 401, 403, 422))

# An architecture of up to megabytes, parsed and validated in the thread pool (`service.api.json_body`).
PlanBody = Annotated[PlanCreate, json_body(PlanCreate)]
PlanId = Annotated[int, Path(ge=1, le=MAX_ID)]


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
def get_plan_route(plan_id: PlanId, session: SessionDep, _key: ReaderKey) -> PlanRead:
    """The plan's status; once succeeded its result (widths, per-layer ratios, latencies), or its error."""
    return describe_plan(get_plan(session, plan_id))


@router.get(
    "/{plan_id}/model",
    summary="Download a plan's pruned model",
    response_class=Response,
    responses={
        200: {
            "content": {media_type: {} for media_type in PLAN_MODEL_MEDIA_TYPES.values()},
            "description": "The pruned model: safetensors (the pruned IR in its header) or ONNX.",
        },
        **error_responses(404, 409, 422),
    },
)
def get_plan_model(
    plan_id: PlanId,
    session: SessionDep,
    _key: ReaderKey,
    model_format: Annotated[
        PlanModelFormat | None,
        Query(alias="format", description="safetensors (default) or onnx; wins over the Accept header."),
    ] = None,
    accept: Annotated[str | None, Header(description="application/onnx asks for ONNX.")] = None,
) -> Response:
    """The uploaded weights of a succeeded weights-mode plan, physically pruned to the filters it kept.

    409 `plan_has_no_model` when the plan was made in architecture mode (widths without weights) or
    has not succeeded yet. The safetensors file loads with `lpnet.pruning.load_pruned`.
    """
    if model_format is None:
        model_format = "onnx" if accept and PLAN_MODEL_MEDIA_TYPES["onnx"] in accept else "safetensors"
    return Response(
        content=plan_model_bytes(session, plan_id, model_format),
        media_type=PLAN_MODEL_MEDIA_TYPES[model_format],
        headers={"Content-Disposition": f'attachment; filename="plan-{plan_id}-pruned.{model_format}"'},
    )
