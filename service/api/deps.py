"""FastAPI dependencies as named `Annotated` aliases, so route signatures stay short.

Sessions do not commit on their own: a route that writes calls ``session.commit()`` once its service
function returned, so a failure half-way leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.auth import authenticate_api_key, require_scope
from service.config import Settings
from service.db.models import ApiKey, KeyScope
from service.errors import Unauthenticated


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    """The app's database engine."""
    engine: Engine = request.app.state.engine
    return engine


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request, closed (and rolled back if uncommitted) when the request ends."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    with factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]

# Two ways to send a key, both shown in the OpenAPI "Authorize" dialog.
_bearer = HTTPBearer(auto_error=False, description="API key as `Authorization: Bearer lpn_...`")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key as `X-API-Key`")


def get_current_key(
    session: SessionDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_api_key_header)],
) -> ApiKey:
    """The active API key the request was made with.

    Raises:
        Unauthenticated: No key was sent, or it is unknown or revoked.
    """
    raw = bearer.credentials if bearer is not None else header_key
    if not raw:
        raise Unauthenticated("missing API key; send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    key = authenticate_api_key(session, raw.strip())
    # Persist last_used_at now, independently of whatever the route does with the session.
    session.commit()
    return key


CurrentKey = Annotated[ApiKey, Depends(get_current_key)]


def scoped(*scopes: KeyScope) -> Any:
    """A dependency that requires a key with one of `scopes` (admin keys always pass).

    Use as ``Annotated[ApiKey, scoped(KeyScope.READER)]``.
    """
    allowed = tuple(scopes)

    def dependency(key: CurrentKey) -> ApiKey:
        require_scope(key, allowed)
        return key

    dependency.__name__ = f"require_{'_or_'.join(scope.value for scope in allowed) or 'admin'}"
    return Depends(dependency)


AdminKey = Annotated[ApiKey, scoped(KeyScope.ADMIN)]
AgentKey = Annotated[ApiKey, scoped(KeyScope.AGENT)]
ReaderKey = Annotated[ApiKey, scoped(KeyScope.READER)]

__all__ = [
    "AdminKey",
    "AgentKey",
    "CurrentKey",
    "EngineDep",
    "ReaderKey",
    "SessionDep",
    "SettingsDep",
    "get_current_key",
    "get_engine",
    "get_session",
    "scoped",
]
