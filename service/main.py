"""The FastAPI application factory.

Run it with ``lpnet serve``, or ``uvicorn --factory service.main:create_app``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy.orm import Session, sessionmaker

from service.api.deps import scoped
from service.api.errors import install_error_handlers
from service.api.json_body import document_json_bodies
from service.api.middleware import BodyLimit, RequestGuardMiddleware, RequestIdMiddleware, RouteRules
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
from service.db.models import KeyScope
from service.db.session import make_engine, make_session_factory
from service.first_run.bootstrap import start_first_run
from service.job_handlers import serving_registry
from service.jobs.worker import WorkerPool
from service.latency import LatencyService
from service.log import install_request_id_record_factory
from service.stale_predictors import queue_stale_refits
from service.version import package_version

logger = logging.getLogger(__name__)

# Probes and the metrics endpoint itself would drown the request metrics.
UNMEASURED_PATHS = ["/healthz", "/readyz", "/metrics"]

ROUTERS: tuple[APIRouter, ...] = (
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
)

# Room in an upload's body for the form's other fields next to the file: the largest is an
# architecture IR as JSON (under 300 KiB for a 700-layer network), plus the multipart framing.
FORM_FIELDS_ALLOWANCE = 1024 * 1024


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
        # onnx and torchvision are imported before serving: a first import inside a request holds the
        # interpreter for a second or more and stalls every other request meanwhile.
        import torch
        import torchvision  # noqa: F401

        import lpnet.arch.onnx_io  # noqa: F401

        # Predictions are many tiny tensor operations: one intra-op thread per request is several
        # times faster than two fighting over the cores, and requests already run in parallel.
        torch.set_num_threads(settings.torch_threads)
        # The child process that traces torchvision names imports torch and torchvision: start it now.
        app.state.latency.tracer.start()
        # Before the workers start: a device whose predictor this lpnet cannot read gets a refit queued.
        queue_stale_refits(settings, session_factory)
        if settings.first_run.enabled:
            # Before the workers start: a bootstrap job left running by a killed server is requeued first.
            start_first_run(settings, session_factory)
        pool = _embedded_workers(settings, session_factory)
        app.state.worker_pool = pool
        try:
            yield
        finally:
            if pool is not None:
                pool.stop()
            app.state.latency.tracer.stop()
            engine.dispose()

    app = FastAPI(
        title="lpnet",
        version=package_version(),
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
    for router in ROUTERS:
        app.include_router(router)
    instrumentator = _expose_metrics(app)
    default_limit, body_limits = _body_limits(settings)
    # Every API route: the app's own (/metrics) and those of the routers, as they were declared.
    routes = [*app.router.routes, *(route for router in ROUTERS for route in router.routes)]
    document_json_bodies(app, routes)
    # The last middleware added runs first: request ids cover every answer, and the request metrics
    # count the guard's 401 and 413 answers too.
    app.add_middleware(RequestGuardMiddleware, rules=RouteRules(routes, body_limits, default_limit))
    instrumentator.instrument(app)
    app.add_middleware(RequestIdMiddleware)
    return app


def _embedded_workers(settings: Settings, session_factory: sessionmaker[Session]) -> WorkerPool | None:
    """The serving process's own worker threads, started (None with ``LPNET_WORKER__EMBEDDED=false``)."""
    if not settings.worker.embedded:
        return None
    pool = WorkerPool(
        session_factory,
        serving_registry(),
        threads=settings.worker.threads,
        lease_seconds=settings.worker.lease_seconds,
        poll_seconds=settings.worker.poll_seconds,
    )
    pool.start()
    return pool


def _body_limits(settings: Settings) -> tuple[BodyLimit, dict[Any, BodyLimit]]:
    """The body limit of most routes, and those of the routes that take more, by endpoint function.

    LPNET_MAX_REQUEST_BYTES caps them all.
    """
    ceiling = BodyLimit(settings.max_request_bytes, "LPNET_MAX_REQUEST_BYTES")

    def capped(limit: BodyLimit) -> BodyLimit:
        return limit if limit.max_bytes <= ceiling.max_bytes else ceiling

    default = capped(BodyLimit(settings.max_json_bytes, "LPNET_MAX_JSON_BYTES"))
    routes = {
        profiles.submit_profiles: BodyLimit(
            settings.max_profile_batch_bytes, "LPNET_MAX_PROFILE_BATCH_BYTES"
        ),
        latency.predict_latency_onnx: BodyLimit(
            settings.max_onnx_bytes + FORM_FIELDS_ALLOWANCE, "LPNET_MAX_ONNX_BYTES", FORM_FIELDS_ALLOWANCE
        ),
        models.upload_model: BodyLimit(
            settings.max_weights_bytes + FORM_FIELDS_ALLOWANCE,
            "LPNET_MAX_WEIGHTS_BYTES",
            FORM_FIELDS_ALLOWANCE,
        ),
    }
    return default, {endpoint: capped(limit) for endpoint, limit in routes.items()}


def _expose_metrics(app: FastAPI) -> Instrumentator:
    """Serve Prometheus metrics at /metrics to admin keys; the caller adds the instrumentator's middleware.

    Request counts and latencies by route, and process metrics. Each app has a registry of its own,
    so several apps in one process (tests) do not share series.
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
    return instrumentator.expose(
        app, endpoint="/metrics", include_in_schema=False, dependencies=[scoped(KeyScope.ADMIN)]
    )
