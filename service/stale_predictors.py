"""Stored predictors that this lpnet cannot read, refitted from the measurements kept beside them.

A newer lpnet may compute other features than the one that fitted a device's predictor (its feature
schema) or read other artifact versions; such a predictor answers 409 until it is refitted. The
measurements it was fitted on are stored, so a serving process queues that refit at start-up.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lpnet.predictor.artifact import ArtifactError, check_readable, read_header
from service.config import FitSettings, Settings
from service.db.models import Device, Job, Predictor
from service.db.session import describe_database_error
from service.devices import latest_predictors
from service.errors import Conflict
from service.jobs.kinds import JobKind
from service.jobs.queue import active_job
from service.predictors import request_fit

logger = logging.getLogger(__name__)


def unreadable_reason(artifact: bytes) -> str | None:
    """Why this lpnet cannot load `artifact`, from its header alone; None when it can."""
    try:
        check_readable(read_header(artifact))
    except ArtifactError as exc:
        return exc.message
    except (KeyError, TypeError, ValueError) as exc:
        return f"its header is malformed ({exc!r})"
    return None


def queue_stale_refits(settings: Settings, factory: sessionmaker[Session]) -> list[int]:
    """Queue a fit of every device whose newest predictor this lpnet cannot read.

    Runs in the start-up of a serving process; never raises (the server serves either way), but logs
    each device it refits and each it cannot (too few stored measurements).

    Returns:
        The ids of the fit jobs queued.
    """
    try:
        with factory() as session:
            queued = _queue(session, settings)
            session.commit()
        return queued
    except SQLAlchemyError as exc:
        logger.warning("stale predictors: not checked, the database failed: %s", describe_database_error(exc))
    return []


def _queue(session: Session, settings: Settings) -> list[int]:
    devices = list(session.scalars(select(Device).order_by(Device.id)))
    newest = latest_predictors(session, [device.id for device in devices])
    queued = []
    for device in devices:
        predictor = newest.get(device.id)
        reason = unreadable_reason(predictor.artifact) if predictor is not None else None
        if predictor is None or reason is None:
            continue
        job = _refit(session, settings, device, predictor, reason)
        if job is not None:
            queued.append(job.id)
    return queued


def _refit(
    session: Session, settings: Settings, device: Device, predictor: Predictor, reason: str
) -> Job | None:
    """The fit job that replaces `predictor`, queued unless one is on its way already."""
    # Imported here: training pulls in scikit-learn, which a server answering queries does not need.
    from lpnet.predictor.train import NotEnoughMeasurements

    if active_job(session, JobKind.BOOTSTRAP, device.id) is not None:
        return None  # the first run fits the device itself
    fit_settings = _fit_settings(settings, device)
    try:
        job = request_fit(session, device, settings.worker.max_attempts, fit_settings)
    except NotEnoughMeasurements as exc:
        logger.warning(
            "device %r: this lpnet cannot read its predictor version %d (%s), and cannot refit it: %s",
            device.name,
            predictor.version,
            reason,
            exc.message,
        )
        return None
    except Conflict as exc:  # a fit is queued or running already
        logger.info(
            "device %r: predictor version %d is unreadable; %s", device.name, predictor.version, exc.message
        )
        return None
    device.status = {
        **(device.status or {}),
        "message": f"refitting predictor version {predictor.version}, which this lpnet cannot read: {reason}",
    }
    logger.info(
        "device %r: predictor version %d cannot be read by this lpnet (%s); refitting it from its stored "
        "measurements (job %d)",
        device.name,
        predictor.version,
        reason,
        job.id,
    )
    return job


def _fit_settings(settings: Settings, device: Device) -> FitSettings:
    """The first run's fit settings for its own device, the server's for every other."""
    if device.is_local and device.name == settings.first_run.device_name:
        return settings.first_run.fit
    return settings.fit
