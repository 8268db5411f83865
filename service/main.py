"""The FastAPI application factory.

Run it with ``lpnet serve``, or ``uvicorn --factory service.main:create_app``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_fastapi_instrumentator import Instrumentator

from service.api.errors import install_error_handlers
from service.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from service.api.routes import (
    agent,
    devices,
    health,
    jobs,
    keys,
    latency,
    models,
    plans,
    predictors,
    profiles,
)
from service.auth import KeyCache
from service.config import Settings, get_settings
from service.db.session import make_engine, make_session_factory
from service.jobs.tasks import serving_registry
from service.jobs.worker import WorkerPool
from service.latency import LatencyService
from service.log import install_request_id_record_factory

logger = logging.getLogger(__name__)

# Probes and the metrics endpoint itself would drown the request metrics.
UNMEASURED_PATHS = ["/healthz", "/readyz", "/metrics"]


def _version() -> str:
    try:
        return metadata.version("lpnet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app: database engine, caches, error handlers, middleware, routes and metrics.

    While the app runs (its lifespan), embedded worker threads run background jobs unless
    ``LPNET_WORKER__EMBEDDED=false``. With ``LPNET_FIRST_RUN__ENABLED`` (the default) its start-up
    registers this machine as the local device and queues its first profile and fit
    (`service.first_run.bootstrap`).

    Args:
        settings: Configuration; defaults to `get_settings()` (the environment).
    """
    settings = settings or get_settings()
    install_request_id_record_factory()
    # Creating an engine does not connect, so the app starts even while the database is down;
    # /readyz reports that.
    engine = make_engine(settings.database_url)
    session_factory = make_session_factory(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import torch

        # Predictions are many tiny tensor operations: one intra-op thread per request is several
        # times faster than two fighting over the cores, and requests already run in parallel.
        torch.set_num_threads(settings.torch_threads)
        pool: WorkerPool | None = None
        if settings.first_run.enabled:
            # Before the workers start: a bootstrap job left running by a killed server is requeued first.
            from service.first_run.bootstrap import start_first_run

            start_first_run(settings, session_factory)
        if settings.worker.embedded:
            pool = WorkerPool(
                session_factory,
                threads=settings.worker.threads,
                registry=serving_registry(),
                lease_seconds=settings.worker.lease_seconds,
                poll_seconds=settings.worker.poll_seconds,
            )
            pool.start()
        app.state.worker_pool = pool
        try:
            yield
        finally:
            if pool is not None:
                pool.stop()
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
    app.state.session_factory = session_factory
    app.state.latency = LatencyService.from_settings(settings)
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.state.worker_pool = None

    install_error_handlers(app)
    for router in (
        health.router,
        devices.router,
        profiles.router,
        latency.router,
        predictors.router,
        plans.router,
        jobs.router,
        models.router,
        keys.router,
        agent.router,
        agent.devices_router,
    ):
        app.include_router(router)
    _instrument(app)
    # The last middleware added runs first: request ids cover the 413 answers of the size limit too.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


def _instrument(app: FastAPI) -> None:
    """Prometheus metrics at /metrics: request counts and latencies by route, and process metrics.

    Each app has a registry of its own, so several apps in one process (tests) do not share series.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    instrumentator = Instrumentator(
        excluded_handlers=UNMEASURED_PATHS,
        should_group_status_codes=False,
        registry=registry,
    )
    instrumentator.instrument(app).expose(app, endpoint="/metrics", include_in_schema=False)
