"""Latency queries: one architecture, many width vectors of one, or an uploaded ONNX file."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.api.deps import LatencyDep, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.api.json_body import json_body, json_body_openapi
from service.api.uploads import read_upload
from service.schemas.latency import BatchLatencyRead, BatchLatencyRequest, LatencyRead, LatencyRequest

router = APIRouter(prefix="/v1/latency", tags=["latency"], responses=error_responses(400, 401, 403, 422))

_QUERY_ERRORS = error_responses(404, 409, 413, 422, 429)

# Bodies of up to megabytes, parsed and validated in the thread pool (`service.api.json_body`).
LatencyBody = Annotated[LatencyRequest, json_body(LatencyRequest)]
BatchLatencyBody = Annotated[BatchLatencyRequest, json_body(BatchLatencyRequest)]


@router.post(
    "",
    summary="Predict an architecture's latency",
    response_model=LatencyRead,
    responses=_QUERY_ERRORS,
    openapi_extra=json_body_openapi(LatencyRequest),
)
async def predict_latency(
    request: LatencyBody, session: SessionDep, latency: LatencyDep, _key: ReaderKey
) -> Response:
    """Total, per-layer and interval of the architecture's latency on the device, from its newest predictor.

    409 with the device's status and profiling progress while it has no predictor.
    """
    # The hot path of the service: one thread hop for the work (which may trace a model for seconds
    # on a cache miss), and the answer as the `LatencyRead` bytes the latency service serialised and
    # cached, sparing a re-validation of a few hundred per-layer entries on every request.
    body = await run_in_threadpool(latency.predict_json, session, request.device, request.architecture)
    return Response(body, media_type="application/json")


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
    _key: ReaderKey,
) -> LatencyRead:
    """Like POST /v1/latency, for a model uploaded as an ONNX file (multipart form)."""
    data = read_upload(file, settings.max_onnx_bytes, "ONNX file", "LPNET_MAX_ONNX_BYTES")
    return latency.predict_onnx(session, device, data, name=file.filename)
