"""Latency queries: one architecture, many width vectors of one, or an uploaded ONNX file; and the
per-layer charts of the queries that asked for one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Response, UploadFile
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.deps import LatencyDep, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.api.json_body import json_body, json_body_openapi
from service.api.uploads import read_upload
from service.config import Settings
from service.db.models import ApiKey
from service.latency import LatencyService, latency_plot_png, store_latency_plot
from service.schemas.latency import (
    PLOT_ID_PATTERN,
    BatchLatencyRead,
    BatchLatencyRequest,
    LatencyRead,
    LatencyRequest,
)

router = APIRouter(prefix="/v1/latency", tags=["latency"], responses=error_responses(400, 401, 403, 422))

_QUERY_ERRORS = error_responses(404, 409, 413, 422, 429)

# Bodies of up to megabytes, parsed and validated in the thread pool (`service.api.json_body`).
LatencyBody = Annotated[LatencyRequest, json_body(LatencyRequest)]
BatchLatencyBody = Annotated[BatchLatencyRequest, json_body(BatchLatencyRequest)]
PlotId = Annotated[str, Path(pattern=PLOT_ID_PATTERN, description="The plot's id, from a plot_url.")]


@router.post(
    "",
    summary="Predict an architecture's latency",
    response_model=LatencyRead,
    responses=_QUERY_ERRORS,
    openapi_extra=json_body_openapi(LatencyRequest),
)
async def predict_latency(
    request: LatencyBody, session: SessionDep, latency: LatencyDep, settings: SettingsDep, key: ReaderKey
) -> Response:
    """Total, per-layer and interval of the architecture's latency on the device, from its newest predictor.

    With `plot`, also a per-layer bar chart, served at the answer's `plot_url` to this key (and admin
    keys) for LPNET_LATENCY_PLOT_TTL_SECONDS. 409 with the device's status and profiling progress
    while it has no predictor.
    """
    if request.plot:
        answer = await run_in_threadpool(_predict_with_plot, request, session, latency, settings, key)
        return Response(answer.model_dump_json(), media_type="application/json")
    # The hot path of the service: one thread hop for the work (which may trace a model for seconds
    # on a cache miss), and the answer as the `LatencyRead` bytes the latency service serialised and
    # cached, sparing a re-validation of a few hundred per-layer entries on every request.
    body = await run_in_threadpool(latency.predict_json, session, request.device, request.architecture)
    return Response(body, media_type="application/json")


def _predict_with_plot(
    request: LatencyRequest, session: Session, latency: LatencyService, settings: Settings, key: ApiKey
) -> LatencyRead:
    """The answer with its chart rendered and stored, in one thread-pool hop."""
    answer = latency.predict(session, request.device, request.architecture)
    answer = store_latency_plot(session, answer, key, settings.latency_plot_ttl_seconds)
    session.commit()
    return answer


@router.post(
    "/batch",
    summary="Predict many width vectors of one architecture",
    responses=_QUERY_ERRORS,
    openapi_extra=json_body_openapi(BatchLatencyRequest),
)
def predict_latency_batch(
    request: BatchLatencyBody, session: SessionDep, latency: LatencyDep, _key: ReaderKey
) -> BatchLatencyRead:
    """Totals and intervals of each width vector (kept channels per group) of the architecture."""
    return latency.predict_batch(session, request.device, request.architecture, request.widths)


@router.post("/onnx", summary="Predict an ONNX model's latency", responses=_QUERY_ERRORS)
def predict_latency_onnx(
    file: Annotated[UploadFile, File(description="The ONNX model (size-capped by LPNET_MAX_ONNX_BYTES).")],
    device: Annotated[str, Form(min_length=1, max_length=128, description="Device id or name.")],
    session: SessionDep,
    latency: LatencyDep,
    settings: SettingsDep,
    key: ReaderKey,
    plot: Annotated[
        bool, Form(description="Also render a per-layer bar chart, as for POST /v1/latency.")
    ] = False,
) -> LatencyRead:
    """Like POST /v1/latency, for a model uploaded as an ONNX file (multipart form)."""
    data = read_upload(file, settings.max_onnx_bytes, "ONNX file", "LPNET_MAX_ONNX_BYTES")
    answer = latency.predict_onnx(session, device, data, name=file.filename)
    if plot:
        answer = store_latency_plot(session, answer, key, settings.latency_plot_ttl_seconds)
        session.commit()
    return answer


@router.get(
    "/plots/{plot_id}.png",
    summary="A latency query's per-layer chart",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "A PNG bar chart."},
        **error_responses(404, 422),
    },
)
def get_latency_plot(plot_id: PlotId, session: SessionDep, settings: SettingsDep, key: ReaderKey) -> Response:
    """The per-layer bar chart of a latency query made with `plot`: predicted ms of each layer in network
    order (the slowest 80 when there are more), the total and its interval in the title. 404 once it
    is older than LPNET_LATENCY_PLOT_TTL_SECONDS, and to keys other than the one that asked for it
    (admin keys read every plot)."""
    png = latency_plot_png(session, plot_id, key, settings.latency_plot_ttl_seconds)
    return Response(content=png, media_type="image/png")
