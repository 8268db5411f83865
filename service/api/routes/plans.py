"""Pruning plans: request one for a latency budget, then poll it for the result and its per-layer chart;
list the caller's plans."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from service.api.deps import LatencyDep, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.api.json_body import json_body, json_body_openapi
from service.api.pagination import PageQuery
from service.db.models import JobStatus
from service.devices import resolve_device
from service.jobs.queue import job_accepted
from service.plans import (
    describe_plan,
    get_plan,
    list_plans,
    plan_layers_png,
    plan_model_bytes,
    request_plan,
)
from service.schemas.common import MAX_ID, NAME_PATTERN, Page
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


@router.get("", summary="List your plans", responses=error_responses(404))
def get_plans(
    session: SessionDep,
    key: ReaderKey,
    page: PageQuery,
    device: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=128,
            pattern=NAME_PATTERN,
            description="Only this device's plans: its id or name.",
        ),
    ] = None,
    status: JobStatus | None = None,
) -> Page[PlanRead]:
    """The plans requested with this API key, newest first, filtered by device and status, a page at a
    time. 404 when the device filter names no device."""
    target = resolve_device(session, device) if device is not None else None
    plans = list_plans(session, key, page, device=target, status=status)
    return Page[PlanRead](items=plans.rows, next_cursor=plans.next_cursor)


@router.get("/{plan_id}", summary="Show a plan", responses=error_responses(404, 422))
def get_plan_route(plan_id: PlanId, session: SessionDep, _key: ReaderKey) -> PlanRead:
    """The plan's status; once succeeded its result (widths, per-layer ratios, latencies), or its error."""
    return describe_plan(get_plan(session, plan_id))


@router.get(
    "/{plan_id}/layers.png",
    summary="Chart a plan's layers before and after pruning",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "A PNG bar chart."},
        **error_responses(404, 409, 422),
    },
)
def get_plan_layers_chart(plan_id: PlanId, session: SessionDep, _key: ReaderKey) -> Response:
    """Per layer, in network order, the predicted latency and the kept output channels before and after
    pruning (the slowest 80 layers when there are more). 409 `plan_not_succeeded` while the plan is
    queued or running, or when it failed."""
    return Response(content=plan_layers_png(session, plan_id), media_type="image/png")


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
