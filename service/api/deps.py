"""FastAPI dependencies as named `Annotated` aliases, so route signatures stay short.

Dependencies are ``async def``: FastAPI runs sync dependencies in its thread pool, and each thread
hop costs about a millisecond of CPU under load, more than the work of these dependencies. The key
check asks the database only when its short-lived cache (`service.auth.KeyCache`) does not know the
key, and then in the thread pool: an unreachable database must never stall the event loop.

Sessions do not commit on their own: a route that writes calls ``session.commit()`` once its service
function returned, so a failure half-way leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool

from service.auth import KeyCache, authenticate_api_key, require_scope
from service.config import Settings
from service.db.models import ApiKey, KeyScope
from service.errors import Unauthenticated
from service.latency import LatencyService


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_key_cache(request: Request) -> KeyCache:
    """The app's cache of recently checked API keys."""
    cache: KeyCache = request.app.state.key_cache
    return cache


async def get_engine(request: Request) -> Engine:
    """The app's database engine."""
    engine: Engine = request.app.state.engine
    return engine


async def get_session_factory(request: Request) -> sessionmaker[Session]:
    """The app's session factory (for work that needs transactions of its own)."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


async def get_latency_service(request: Request) -> LatencyService:
    """The app's latency service with its caches."""
    latency: LatencyService = request.app.state.latency
    return latency


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for one request, closed (and rolled back if uncommitted) when the request ends.

    Opening a session does no I/O (it connects on first use, in the route's thread); closing it
    returns the connection to the pool, a local round trip at most.
    """
    factory: sessionmaker[Session] = request.app.state.session_factory
    with factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
LatencyDep = Annotated[LatencyService, Depends(get_latency_service)]
KeyCacheDep = Annotated[KeyCache, Depends(get_key_cache)]

# Two ways to send a key, both shown in the OpenAPI "Authorize" dialog.
_bearer = HTTPBearer(auto_error=False, description="API key as `Authorization: Bearer lpn_...`")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key as `X-API-Key`")

# Where `service.api.middleware.RequestGuardMiddleware` leaves the key it checked (``request.state``).
API_KEY_STATE = "api_key"


async def sent_api_key(request: Request) -> str | None:
    """The raw key a request carries: ``Authorization: Bearer`` if given, else ``X-API-Key``.

    Parsed by the same security schemes `get_current_key` declares, so both read a key alike.
    """
    bearer = await _bearer(request)
    return bearer.credentials if bearer is not None else await _api_key_header(request)


async def check_api_key(app: Starlette, raw: str | None) -> ApiKey:
    """The active key row of `raw`, from the app's key cache or else the database (in the thread pool).

    Raises:
        Unauthenticated: No key was sent, or it is unknown or revoked.
    """
    if not raw:
        raise Unauthenticated("missing API key; send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    raw = raw.strip()
    cache: KeyCache = app.state.key_cache
    key = cache.get(raw)
    if key is None:
        # Read before the database check: a revocation clearing the cache meanwhile keeps the row out.
        generation = cache.generation
        factory: sessionmaker[Session] = app.state.session_factory
        key = await run_in_threadpool(_authenticate, factory, raw)
        cache.put(raw, key, generation)
    return key


async def get_current_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_api_key_header)],
) -> ApiKey:
    """The active API key the request was made with.

    The app's `RequestGuardMiddleware` checks the key of every route that needs one before the body
    is read and leaves it in ``request.state``; a route the middleware does not know (one added to
    the app after `service.main.create_app` built it) has its key checked here.

    Raises:
        Unauthenticated: No key was sent, or it is unknown or revoked.
    """
    checked: ApiKey | None = getattr(request.state, API_KEY_STATE, None)
    if checked is not None:
        return checked
    return await check_api_key(request.app, bearer.credentials if bearer is not None else header_key)


def _authenticate(factory: sessionmaker[Session], raw: str) -> ApiKey:
    # A session of its own, committed at once: last_used_at is stored whatever the route does.
    with factory() as session:
        key = authenticate_api_key(session, raw)
        session.commit()
        return key


CurrentKey = Annotated[ApiKey, Depends(get_current_key)]


def scoped(*scopes: KeyScope) -> Any:
    """A dependency that requires a key with one of `scopes` (admin keys always pass).

    Use as ``Annotated[ApiKey, scoped(KeyScope.READER)]``.
    """
    allowed = tuple(scopes)

    async def dependency(key: CurrentKey) -> ApiKey:
        require_scope(key, allowed)
        return key

    dependency.__name__ = f"require_{'_or_'.join(scope.value for scope in allowed) or 'admin'}"
    return Depends(dependency)


AdminKey = Annotated[ApiKey, scoped(KeyScope.ADMIN)]
AgentKey = Annotated[ApiKey, scoped(KeyScope.AGENT)]
ReaderKey = Annotated[ApiKey, scoped(KeyScope.READER)]

__all__ = [
    "API_KEY_STATE",
    "AdminKey",
    "AgentKey",
    "CurrentKey",
    "EngineDep",
    "KeyCacheDep",
    "LatencyDep",
    "ReaderKey",
    "SessionDep",
    "SessionFactoryDep",
    "SettingsDep",
    "check_api_key",
    "get_current_key",
    "get_engine",
    "get_latency_service",
    "get_session",
    "get_session_factory",
    "scoped",
    "sent_api_key",
]
