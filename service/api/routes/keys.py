"""API keys: create (shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.deps import AdminKey, KeyCacheDep, SessionDep
from service.api.errors import error_responses
from service.api.pagination import PageQuery
from service.auth import create_api_key, page_api_keys, revoke_api_key
from service.devices import resolve_device
from service.schemas.common import Page
from service.schemas.keys import ApiKeyCreate, ApiKeyCreated, ApiKeyRead

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=error_responses(400, 401, 403, 422))


@router.post("", status_code=201, summary="Create an API key", responses=error_responses(404, 413, 422))
def create_key(spec: ApiKeyCreate, session: SessionDep, _key: AdminKey) -> ApiKeyCreated:
    """Create a key; the key itself is in this answer only (only its hash is stored)."""
    device = resolve_device(session, spec.device) if spec.device is not None else None
    row, raw = create_api_key(session, scope=spec.scope.value, name=spec.name, device=device)
    session.commit()
    return ApiKeyCreated(**ApiKeyRead.model_validate(row).model_dump(), key=raw)


@router.get("", summary="List API keys")
def get_keys(session: SessionDep, _key: AdminKey, page: PageQuery) -> Page[ApiKeyRead]:
    """The keys' prefixes, scopes and dates (never the keys), oldest first, a page at a time."""
    keys = page_api_keys(session, page)
    return Page[ApiKeyRead](
        items=[ApiKeyRead.model_validate(key) for key in keys.rows], next_cursor=keys.next_cursor
    )


@router.delete("/{prefix}", summary="Revoke an API key", responses=error_responses(404, 409, 422))
def revoke_key(
    prefix: Annotated[str, Path(min_length=1, max_length=128)],
    session: SessionDep,
    cache: KeyCacheDep,
    _key: AdminKey,
) -> ApiKeyRead:
    """Revoke the active key with this prefix (as listed), or pass the whole key; it stops working at once
    on this server, and within LPNET_AUTH_CACHE_SECONDS on others."""
    key = revoke_api_key(session, prefix)
    session.commit()
    cache.clear()
    return ApiKeyRead.model_validate(key)
