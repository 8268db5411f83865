"""Predictors: fit one from a device's measurements, store it as a new version, load it back.

Fitting takes seconds to minutes, so it runs outside any database transaction: the samples are read
in one short session, the fit runs, and the predictor row is written in the transaction that marks
the job succeeded (or, from the CLI, in one short transaction of its own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lpnet.predictor.artifact import ArtifactError, dump_predictor, load_predictor, read_header
from lpnet.predictor.features import FEATURE_SCHEMA_VERSION
from lpnet.predictor.model import LPNetConfig
from lpnet.predictor.predict import LatencyPredictor
from lpnet.predictor.samples import NetworkSample
from service.config import FitSettings
from service.db.base import utcnow
from service.db.models import Device, Job, MeasurementStatus, NetworkMeasurement, Predictor
from service.devices import describe_device, latest_predictor, set_device_status
from service.errors import Conflict, InvalidInput, NotFound
from service.jobs.context import JobContext
from service.jobs.kinds import JobKind
from service.jobs.queue import ClaimedJob, TaskOutcome, active_job, enqueue
from service.pagination import Keyset, Page, PageRequest, paginate
from service.schemas.fits import PredictorMetrics
from service.schemas.predictors import PredictorRead
from service.training_set import TrainingSet, training_samples

if TYPE_CHECKING:
    from lpnet.predictor.train import TrainConfig

logger = logging.getLogger(__name__)

PREDICTOR_KIND = "lpnet"
# The longest training fingerprint a predictor row holds.
FINGERPRINT_MAX_LENGTH = 128

ProgressFn = Callable[[int, int], None]


class NoPredictor(Conflict):
    """The device has no fitted predictor yet, so there is no number to give."""

    code = "no_predictor"


class UnreadablePredictor(Conflict):
    """A stored predictor that this lpnet cannot read (an older artifact version or feature schema)."""

    code = ArtifactError.code


class InvalidPredictorArtifact(InvalidInput):
    """Imported bytes that this lpnet cannot read as a predictor (format, versions, tensors)."""

    code = ArtifactError.code


@dataclass(frozen=True)
class FittedPredictor:
    """What a fit produced, ready to be stored."""

    artifact: bytes
    metrics: dict[str, Any]
    plot_png: bytes | None
    fingerprint: str
    feature_schema_version: int
    samples: int
    seconds: float


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON, and PostgreSQL, have neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    return value


def ok_network_count(session: Session, device_id: int) -> int:
    """Distinct architectures the device has timed successfully: the samples a fit learns from.

    Repeated timings of one architecture count once (`training_samples` merges them).
    """
    count = session.scalar(
        select(func.count(func.distinct(NetworkMeasurement.arch_hash))).where(
            NetworkMeasurement.device_id == device_id, NetworkMeasurement.status == MeasurementStatus.OK
        )
    )
    return int(count or 0)


def min_fit_networks() -> int:
    """Measured networks a fit needs: enough for every member after its fold is left out."""
    # Imported here, as in the functions below: training pulls in scikit-learn, seconds of start-up
    # that a server answering latency queries does not need.
    from lpnet.predictor.report import min_report_networks

    return min_report_networks()


def check_enough_measurements(session: Session, device: Device) -> None:
    """Refuse a fit that cannot succeed, saying how many more networks to measure.

    Raises:
        lpnet.predictor.train.NotEnoughMeasurements: Fewer measured networks than a fit needs.
    """
    from lpnet.predictor.train import NotEnoughMeasurements

    have = ok_network_count(session, device.id)
    need = min_fit_networks()
    if have < need:
        raise NotEnoughMeasurements(
            f"device {device.name!r} has {have} measured network(s); a fit needs at least {need}: "
            f"measure {need - have} more (lpnet profile, or a device agent)",
            {"device": device.name, "have": have, "need": need, "missing": need - have},
        )


def fit_configs(
    settings: FitSettings,
    seed: int = 0,
    last_level_cache_kb: int | None = None,
    fresh_mapping_kb: int | None = None,
) -> tuple[LPNetConfig, TrainConfig]:
    """The ensemble and the optimisation of a fit: `settings` where set, lpnet's defaults elsewhere;
    the device's last-level cache and mapping threshold (KiB, `LPNetConfig.spill_kb`) where known."""
    from lpnet.predictor.train import TrainConfig

    members = {"members": settings.members} if settings.members is not None else {}
    config = LPNetConfig(
        last_level_cache_kb=last_level_cache_kb, fresh_mapping_kb=fresh_mapping_kb, **members
    )
    steps = {"steps": settings.steps} if settings.steps is not None else {}
    return config, TrainConfig(seed=seed, **steps)


def fit_from_samples(
    samples: list[NetworkSample] | TrainingSet,
    progress: ProgressFn | None = None,
    settings: FitSettings | None = None,
) -> FittedPredictor:
    """Fit a predictor with its report (metrics, plot, fingerprint) and serialise it.

    A `TrainingSet` adds what its latencies mean (`labels`, `nominal_probe_ms`) to the metrics.

    Raises:
        NotEnoughMeasurements: Too few networks for every member to fit without its fold.
    """
    from lpnet.predictor.report import fit_with_report

    basis: dict[str, Any] = {"labels": "ms", "nominal_probe_ms": None}
    limits: tuple[int | None, int | None] = (None, None)
    if isinstance(samples, TrainingSet):
        basis, limits = samples.describe(), (samples.last_level_cache_kb, samples.fresh_mapping_kb)
        samples = samples.samples
    config, train = fit_configs(settings or FitSettings(), 0, *limits)
    started = time.perf_counter()
    report = fit_with_report(samples, config, train, progress=progress)
    metrics = json_safe({**report.metrics, **basis})
    artifact = dump_predictor(
        report.predictor, extra={"metrics": metrics, "training_fingerprint": report.fingerprint}
    )
    return FittedPredictor(
        artifact=artifact,
        metrics=metrics,
        plot_png=report.scatter_png or None,
        fingerprint=report.fingerprint,
        feature_schema_version=FEATURE_SCHEMA_VERSION,
        samples=len(samples),
        seconds=time.perf_counter() - started,
    )


def store_predictor(session: Session, device_id: int, fitted: FittedPredictor) -> Predictor:
    """Add the fitted predictor as the device's next version (the caller commits).

    The (device, version) unique constraint turns a concurrent fit of the same device into an
    IntegrityError rather than two predictors with one version.
    """
    newest = session.scalar(select(func.max(Predictor.version)).where(Predictor.device_id == device_id))
    predictor = Predictor(
        device_id=device_id,
        kind=PREDICTOR_KIND,
        version=int(newest or 0) + 1,
        artifact=fitted.artifact,
        feature_schema_version=fitted.feature_schema_version,
        metrics=fitted.metrics,
        training_fingerprint=fitted.fingerprint,
        plot_png=fitted.plot_png,
    )
    session.add(predictor)
    session.flush()
    device = session.get(Device, device_id)
    if device is not None:
        device.status = None  # the device is ready; its status is derived from the predictor now
    return predictor


def request_fit(
    session: Session, device: Device, max_attempts: int, settings: FitSettings | None = None
) -> Job:
    """Queue a fit job for the device (the caller commits).

    Raises:
        NotEnoughMeasurements: The device has too few measured networks.
        Conflict: A fit of this device is queued or running already.
    """
    check_enough_measurements(session, device)
    running = active_job(session, JobKind.FIT, device.id)
    if running is not None:
        raise Conflict(
            f"a fit of device {device.name!r} is {running.status} already (job {running.id}); "
            f"poll GET /v1/jobs/{running.id}",
            {"job_id": running.id, "status": running.status},
        )
    fit_settings = (settings or FitSettings()).model_dump(mode="json")
    job = enqueue(
        session,
        JobKind.FIT,
        {"device_id": device.id, "fit": fit_settings},
        device_id=device.id,
        max_attempts=max_attempts,
    )
    device.status = {
        "phase": "fitting",
        "percent": 0.0,
        "message": "fit queued",
        "job_id": job.id,
        "updated_at": utcnow().isoformat(),
    }
    return job


def run_fit_job(job: ClaimedJob, context: JobContext) -> TaskOutcome:
    """The fit task: read the samples, fit, and store the predictor with the job's success."""
    device_id = int(job.input["device_id"])
    context.progress("loading", 0.0, message="reading measurements", device_phase="fitting", force=True)
    with context.factory() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFound(f"device {device_id} was deleted before its fit ran", {"device_id": device_id})
        check_enough_measurements(session, device)
        samples = training_samples(session, device_id)
    started = time.perf_counter()

    def progress(step: int, total: int) -> None:
        share = step / total if total else 0.0
        elapsed = time.perf_counter() - started
        eta = elapsed / share * (1 - share) if share > 0.02 else None
        context.progress("fitting", 100.0 * share, eta, f"step {step} of {total}", device_phase="fitting")

    fitted = fit_from_samples(samples, progress, FitSettings.model_validate(job.input.get("fit") or {}))
    context.check()

    def store(session: Session) -> dict[str, Any]:
        predictor = store_predictor(session, device_id, fitted)
        return {"predictor_id": predictor.id, "version": predictor.version}

    result = {
        "device_id": device_id,
        "samples": fitted.samples,
        "seconds": round(fitted.seconds, 2),
        "metrics": fitted.metrics,
        "training_fingerprint": fitted.fingerprint,
    }
    return TaskOutcome(result=result, store=store)


def fit_failed(factory: sessionmaker[Session], job: ClaimedJob, error: str) -> None:
    """Show a failed fit in its device's status."""
    if job.device_id is not None:
        set_device_status(factory, job.device_id, "failed", message=f"fit failed: {error}", job_id=job.id)


def get_predictor(session: Session, predictor_id: int) -> Predictor:
    """Return predictor `predictor_id`.

    Raises:
        NotFound: No such predictor.
    """
    predictor = session.get(Predictor, predictor_id)
    if predictor is None:
        raise NotFound(f"no predictor with id {predictor_id}", {"predictor_id": predictor_id})
    return predictor


def current_predictor(session: Session, device: Device) -> Predictor:
    """The newest predictor of `device`.

    Raises:
        NoPredictor: The device has none yet; the details carry its status and profiling counts.
    """
    predictor = latest_predictor(session, device)
    if predictor is not None:
        return predictor
    described = describe_device(session, device)
    status = described.status
    if status.phase in ("profiling", "fitting"):
        eta = f", about {status.eta_seconds:.0f} s left" if status.eta_seconds is not None else ""
        percent = f" {status.percent:.0f} %" if status.percent is not None else ""
        advice = f"it is {status.phase}{percent}{eta}; retry when it is ready (GET /v1/devices/{device.id})"
    else:
        advice = "profile it, then fit one (POST /v1/devices/{id}/predictors or `lpnet fit`)"
    raise NoPredictor(
        f"device {device.name!r} has no fitted predictor yet ({status.phase}"
        f"{': ' + status.message if status.message else ''}); {advice}",
        {
            "device": device.name,
            "device_id": device.id,
            "status": described.status.model_dump(mode="json"),
            "profiling": described.profiling.model_dump(mode="json"),
        },
    )


def describe_predictors(session: Session, predictors: list[Predictor]) -> list[PredictorRead]:
    """Predictors as clients see them, with the URL of their plot when they have one."""
    ids = [predictor.id for predictor in predictors]
    with_plot = set(
        session.scalars(select(Predictor.id).where(Predictor.id.in_(ids), Predictor.plot_png.is_not(None)))
    )
    names = {
        row.id: row.name
        for row in session.execute(
            select(Device.id, Device.name).where(Device.id.in_({p.device_id for p in predictors}))
        )
    }
    return [
        PredictorRead(
            id=predictor.id,
            device_id=predictor.device_id,
            device=names.get(predictor.device_id, ""),
            version=predictor.version,
            kind=predictor.kind,
            feature_schema_version=predictor.feature_schema_version,
            metrics=predictor.metrics,
            training_fingerprint=predictor.training_fingerprint,
            created_at=predictor.created_at,
            plot_url=f"/v1/predictors/{predictor.id}/plot.png" if predictor.id in with_plot else None,
        )
        for predictor in predictors
    ]


# A device's predictors are listed newest version first; versions are unique per device.
PREDICTOR_LIST = Keyset("device_predictors", Predictor.version, descending=True)


def list_device_predictors(session: Session, device: Device, page: PageRequest) -> Page[PredictorRead]:
    """A page of `device`'s predictor versions, newest first."""
    query = select(Predictor).where(Predictor.device_id == device.id)
    rows = paginate(session, query, PREDICTOR_LIST, page, {"device": device.id})
    return rows.map(lambda predictors: describe_predictors(session, predictors))


def predictor_plot(session: Session, predictor_id: int) -> bytes:
    """The predicted-vs-measured PNG of a predictor.

    Raises:
        NotFound: No such predictor, or it has no plot.
    """
    get_predictor(session, predictor_id)
    png = session.scalar(select(Predictor.plot_png).where(Predictor.id == predictor_id))
    if not png:
        raise NotFound(f"predictor {predictor_id} has no plot", {"predictor_id": predictor_id})
    return png


def predictor_nominal_probe_ms(session: Session, predictor_id: int) -> float | None:
    """The probe time a predictor's latencies are at, when it was fitted on probe labels (else None).

    Verification measures at this speed, so measured and predicted latencies share one scale.
    """
    metrics = session.scalar(select(Predictor.metrics).where(Predictor.id == predictor_id)) or {}
    nominal = metrics.get("nominal_probe_ms") if metrics.get("labels") == "probe" else None
    return float(nominal) if isinstance(nominal, int | float) and nominal > 0 else None


def predictor_artifact(session: Session, predictor_id: int) -> bytes:
    """The stored artifact of a predictor: safetensors with its versions, metrics and fingerprint.

    Raises:
        NotFound: No such predictor.
    """
    artifact = session.scalar(select(Predictor.artifact).where(Predictor.id == predictor_id))
    if artifact is None:
        raise NotFound(f"no predictor with id {predictor_id}", {"predictor_id": predictor_id})
    return artifact


def load_predictor_artifact(session: Session, predictor_id: int) -> LatencyPredictor:
    """Deserialise a stored predictor (safetensors, never pickle).

    Raises:
        UnreadablePredictor: Its artifact version or feature schema is not this lpnet's; the message
            names the refit of the device that is queued or running, if there is one.
    """
    try:
        return load_predictor(predictor_artifact(session, predictor_id))
    except ArtifactError as exc:
        raise _unreadable(session, predictor_id, exc) from exc


def _unreadable(session: Session, predictor_id: int, exc: ArtifactError) -> UnreadablePredictor:
    row = session.get(Predictor, predictor_id)
    device = session.get(Device, row.device_id) if row is not None else None
    if row is None or device is None:
        return UnreadablePredictor(exc.message, exc.details)
    fit = active_job(session, JobKind.FIT, device.id)
    advice = (
        f"; a refit from its stored measurements is {fit.status} (job {fit.id}): retry once "
        f"GET /v1/jobs/{fit.id} has succeeded"
        if fit is not None
        else f" (or POST /v1/devices/{device.id}/predictors)"
    )
    return UnreadablePredictor(
        f"device {device.name!r} serves predictor version {row.version}, which this lpnet cannot read: "
        f"{exc.message}{advice}",
        {
            **exc.details,
            "device": device.name,
            "predictor_version": row.version,
            "refit_job_id": fit.id if fit is not None else None,
        },
    )


def _typed_metrics(metrics: Any) -> dict[str, Any]:
    """The part of an imported artifact's metrics that `PredictorMetrics` names and types, as JSON.

    An artifact's header may hold anything: keys the model does not name, and values that do not fit
    their key's type, are left out (at any depth) and logged, so the stored metrics read back typed.
    """
    if not isinstance(metrics, dict):
        if metrics is not None:
            logger.warning("imported metrics are %s, not an object; stored none", type(metrics).__name__)
        return {}
    raw = json_safe(metrics)
    kept: dict[str, Any] = _named_keys(PredictorMetrics.model_validate(raw))
    dropped = _left_out(raw, kept)
    if dropped:
        logger.warning("imported metrics: left out keys unknown or of the wrong type: %s", ", ".join(dropped))
    return kept


def _named_keys(value: Any) -> Any:
    """`value` as JSON, keeping of each model only the fields it names that the document had."""
    if isinstance(value, BaseModel):
        return {
            name: _named_keys(getattr(value, name))
            for name in type(value).model_fields
            if name in value.model_fields_set
        }
    if isinstance(value, list):
        return [_named_keys(item) for item in value]
    if isinstance(value, dict):
        return {key: _named_keys(item) for key, item in value.items()}
    return value


def _left_out(raw: Any, kept: Any, where: str = "") -> list[str]:
    """Dotted paths of the keys of `raw` that `kept` lacks (list items by index)."""
    if isinstance(raw, dict) and isinstance(kept, dict):
        paths: list[str] = []
        for key, item in raw.items():
            path = f"{where}.{key}" if where else key
            paths += _left_out(item, kept[key], path) if key in kept else [path]
        return paths
    if isinstance(raw, list) and isinstance(kept, list) and len(raw) == len(kept):
        pairs = enumerate(zip(raw, kept, strict=True))
        return [path for i, (item, kept_item) in pairs for path in _left_out(item, kept_item, f"{where}.{i}")]
    return []


def import_predictor(session: Session, device: Device, data: bytes) -> Predictor:
    """Store an exported predictor artifact as the device's next version (the caller commits).

    The artifact is loaded first, so one this lpnet cannot use is refused rather than stored; its
    metrics (what of them `PredictorMetrics` types, see `_typed_metrics`) and training fingerprint come
    from its header (the artifact's SHA-256 when it has none).

    Raises:
        InvalidPredictorArtifact: Not a predictor artifact, one of a version or feature schema this
            lpnet does not read, or tensors that do not match its config.
    """
    from safetensors import SafetensorError

    try:
        load_predictor(data)
        extra = json.loads(read_header(data).get("extra", "{}"))
    except ArtifactError as exc:
        raise InvalidPredictorArtifact(exc.message, exc.details) from exc
    except (SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise InvalidPredictorArtifact(f"not a readable lpnet predictor artifact: {exc}") from exc
    extra = extra if isinstance(extra, dict) else {}
    metrics = extra.get("metrics")
    fingerprint = extra.get("training_fingerprint")
    fitted = FittedPredictor(
        artifact=data,
        metrics=_typed_metrics(metrics),
        plot_png=None,
        fingerprint=fingerprint
        if isinstance(fingerprint, str) and len(fingerprint) <= FINGERPRINT_MAX_LENGTH
        else hashlib.sha256(data).hexdigest(),
        feature_schema_version=FEATURE_SCHEMA_VERSION,
        samples=0,
        seconds=0.0,
    )
    return store_predictor(session, device.id, fitted)
