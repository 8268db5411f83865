"""The FastAPI application factory.

Run it with ``lpnet serve``, or ``uvicorn --factory service.main:create_app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI

from service.api.errors import install_error_handlers
from service.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from service.api.routes import health
from service.config import Settings, get_settings
from service.db.session import make_engine, make_session_factory
from service.log import install_request_id_record_factory


def _version() -> str:
    try:
        return metadata.version("lpnet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app: database engine, error handlers, middleware and routes.

    Args:
        settings: Configuration; defaults to `get_settings()` (the environment).
    """
    settings = settings or get_settings()
    install_request_id_record_factory()
    # Creating an engine does not connect, so the app starts even while the database is down;
    # /readyz reports that.
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="lpnet",
        version=_version(),
        summary="Latency prediction and latency-budgeted pruning for CNNs.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)

    install_error_handlers(app)
    # The last middleware added runs first: request ids cover the 413 answers of the size limit too.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)

    app.include_router(health.router)
    return app
