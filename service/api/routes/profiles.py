"""Profile submission: a device agent posts batches of measurements for its device."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from profiler.batch import KEY_PATTERN, ProfileBatch
from service.api.deps import AgentKey, SessionDep
from service.api.errors import error_responses
from service.api.routes.devices import DevicePath
from service.auth import require_device_key
from service.devices import resolve_device
from service.profiles import submit_profile_batch
from service.schemas.profiles import ProfileSubmissionRead

router = APIRouter(prefix="/v1/devices", tags=["profiles"], responses=error_responses(400, 401, 403, 422))

REPLAY_HEADER = "Idempotency-Replayed"


@router.post(
    "/{device}/profiles",
    status_code=201,
    summary="Submit a batch of measurements",
    responses=error_responses(404, 409, 413, 422),
)
def submit_profiles(
    device: DevicePath,
    batch: ProfileBatch,
    response: Response,
    session: SessionDep,
    key: AgentKey,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=8,
            max_length=128,
            pattern=KEY_PATTERN,
            description="Optional; must equal the batch's idempotency_key.",
        ),
    ] = None,
) -> ProfileSubmissionRead:
    """Store a batch measured on the device, with the device's agent key (or an admin key).

    Idempotent on the batch's `idempotency_key`: a replay (the same key with the same body) stores
    nothing and gets the first answer again, marked with the `Idempotency-Replayed: true` header; the
    same key with another body gets 409 `idempotency_key_reused`. Rows whose sample key the device
    already has are skipped and counted.
    """
    target = resolve_device(session, device)
    require_device_key(key, target)
    outcome = submit_profile_batch(session, target, batch, idempotency_key)
    if outcome.replayed:
        response.headers[REPLAY_HEADER] = "true"
    return ProfileSubmissionRead.model_validate(outcome.response)
