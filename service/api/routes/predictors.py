"""Fitted predictors: metrics, the predicted-vs-measured plot and the artifact to take elsewhere."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from service.api.deps import ReaderKey, SessionDep
from service.api.errors import error_responses
from service.predictors import describe_predictors, get_predictor, predictor_artifact, predictor_plot
from service.schemas.common import MAX_ID
from service.schemas.predictors import PredictorRead

router = APIRouter(
    prefix="/v1/predictors", tags=["predictors"], responses=error_responses(401, 403, 404, 422)
)

PredictorId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("/{predictor_id}", summary="Show a predictor", responses=error_responses(422))
def get_predictor_route(predictor_id: PredictorId, session: SessionDep, _key: ReaderKey) -> PredictorRead:
    """A predictor's version, metrics and training fingerprint."""
    return describe_predictors(session, [get_predictor(session, predictor_id)])[0]


@router.get(
    "/{predictor_id}/plot.png",
    summary="Predicted vs measured latency",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "A PNG scatter plot."},
        **error_responses(422),
    },
)
def get_predictor_plot(predictor_id: PredictorId, session: SessionDep, _key: ReaderKey) -> Response:
    """The PNG plot of the fit: predicted against measured latency of held-out networks."""
    return Response(content=predictor_plot(session, predictor_id), media_type="image/png")


@router.get(
    "/{predictor_id}/artifact",
    summary="Export a predictor",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The predictor's safetensors artifact.",
        },
        **error_responses(422),
    },
)
def get_predictor_artifact(predictor_id: PredictorId, session: SessionDep, _key: ReaderKey) -> Response:
    """The predictor as the service stores it: safetensors with its versions, metrics and fingerprint in
    the header. `lpnet.load_predictor` reads it; POST /v1/devices/{device}/predictors/import stores it
    on another device or server."""
    return Response(
        content=predictor_artifact(session, predictor_id),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="predictor-{predictor_id}.safetensors"'},
    )
