"""Devices: register (with the agent key), list, show; fit or import a device's predictor."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path

from service.api.deps import AdminKey, AgentKey, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.api.pagination import PageQuery
from service.auth import require_device_key
from service.devices import (
    describe_created_device,
    describe_device,
    describe_devices,
    page_devices,
    register_device,
    resolve_device,
)
from service.jobs.queue import job_accepted
from service.predictors import describe_predictors, import_predictor, list_device_predictors, request_fit
from service.schemas.common import Page
from service.schemas.devices import DeviceCreate, DeviceCreated, DeviceRead
from service.schemas.jobs import JobAccepted
from service.schemas.predictors import PredictorRead

router = APIRouter(prefix="/v1/devices", tags=["devices"], responses=error_responses(400, 401, 403, 422))

DevicePath = Annotated[
    str, Path(min_length=1, max_length=128, description="The device's numeric id or its name.")
]


@router.post(
    "",
    status_code=201,
    summary="Register a device",
    responses=error_responses(409, 413, 422),
)
def create_device(spec: DeviceCreate, session: SessionDep, _key: AdminKey) -> DeviceCreated:
    """Register a device and create its agent API key, which is shown in this answer only."""
    device, agent_key = register_device(session, spec)
    session.commit()
    return describe_created_device(session, device, agent_key)


@router.get("", summary="List devices")
def get_devices(session: SessionDep, _key: ReaderKey, page: PageQuery) -> Page[DeviceRead]:
    """The devices by name, with their profiling counts, newest predictor and status, a page at a time."""
    devices = page_devices(session, page).map(lambda rows: describe_devices(session, rows))
    return Page[DeviceRead](items=devices.rows, next_cursor=devices.next_cursor)


@router.get("/{device}", summary="Show a device", responses=error_responses(404))
def get_device(device: DevicePath, session: SessionDep, _key: ReaderKey) -> DeviceRead:
    """A device with its profiling counts, newest predictor and status (phase, percent, ETA)."""
    return describe_device(session, resolve_device(session, device))


@router.post(
    "/{device}/predictors",
    status_code=202,
    summary="Fit a new predictor version",
    responses=error_responses(404, 409, 422),
)
def fit_predictor(
    device: DevicePath, session: SessionDep, settings: SettingsDep, _key: AdminKey
) -> JobAccepted:
    """Queue a fit of the device's predictor on its measurements; poll the job for progress.

    422 when the device has too few measured networks (the answer says how many more), 409 when a
    fit of the device is already queued or running.
    """
    job = request_fit(session, resolve_device(session, device), settings.worker.max_attempts, settings.fit)
    session.commit()
    return job_accepted(job)


@router.get("/{device}/predictors", summary="List a device's predictors", responses=error_responses(404))
def get_device_predictors(
    device: DevicePath, session: SessionDep, _key: ReaderKey, page: PageQuery
) -> Page[PredictorRead]:
    """The device's predictor versions, newest first, a page at a time."""
    predictors = list_device_predictors(session, resolve_device(session, device), page)
    return Page[PredictorRead](items=predictors.rows, next_cursor=predictors.next_cursor)


@router.post(
    "/{device}/predictors/import",
    status_code=201,
    summary="Import a predictor",
    responses=error_responses(404, 413),
)
def import_device_predictor(
    device: DevicePath,
    artifact: Annotated[
        bytes,
        Body(
            media_type="application/octet-stream",
            description="A predictor artifact (GET /v1/predictors/{id}/artifact); LPNET_MAX_JSON_BYTES at most.",
        ),
    ],
    session: SessionDep,
    key: AgentKey,
) -> PredictorRead:
    """Store an exported predictor as the device's next version, with the device's agent key or an
    admin key.

    The artifact is loaded first: 422 `predictor_artifact_unreadable` naming the version or feature
    schema it has and those this server reads, or what else is wrong with it.
    """
    target = resolve_device(session, device)
    require_device_key(key, target)
    predictor = import_predictor(session, target, artifact)
    session.commit()
    return describe_predictors(session, [predictor])[0]
