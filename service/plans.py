"""Pruning plans: checked when requested, computed by a job with the planner in `lpnet.gates`.

What can be checked at once is checked when the plan is requested, so a client hears about an unknown
device, a device without a predictor, an unreachable budget or missing weights with a 4xx rather than
a failed job: the budget check is one predictor call with every group at its minimum width.

Plans cost the server work, so a reader key has quotas (`QuotaSettings`: plans queued or running at
once, plans per hour; 429 with ``Retry-After`` beyond them); admin keys are exempt. ``verify`` on a
local device times networks on the server's own machine and needs an admin key; on a remote device
its agent measures, and any key that may plan may ask for it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from lpnet.arch.ir import Network
from lpnet.errors import InvalidPlanOptions
from lpnet.gates.options import PlanMode
from service.agents.verify import cancel_verify_tasks, remote_measure
from service.config import QuotaSettings, Settings, get_settings
from service.db.base import utcnow
from service.db.models import ApiKey, Device, Job, JobStatus, KeyScope
from service.devices import resolve_device
from service.errors import Conflict, InvalidInput, PermissionDenied, QuotaExceeded, Unauthenticated
from service.jobs.context import JobContext
from service.jobs.kinds import JobKind
from service.jobs.queue import ClaimedJob, TaskOutcome, enqueue, get_job
from service.latency import LatencyService
from service.pagination import Keyset, Page, PageRequest, paginate
from service.predictors import (
    current_predictor,
    json_safe,
    load_predictor_artifact,
    predictor_nominal_probe_ms,
)
from service.schemas.devices import AllocatorRead
from service.schemas.plan_results import PlanResultRead
from service.schemas.plans import PlanCreate, PlanModelFormat, PlanOptions, PlanRead
from service.uploads import get_model_upload, load_weights

if TYPE_CHECKING:
    from lpnet.gates.planner import PlanOptions as PlannerOptions
    from lpnet.measurement import MeasuredLatency, MeasureFn
    from lpnet.pruning import PrunedModel

logger = logging.getLogger(__name__)

# A key at its limit of plans at once is told to retry after this long: a plan takes seconds to minutes.
ACTIVE_PLANS_RETRY_SECONDS = 30
QUOTA_WINDOW = timedelta(hours=1)


class PlanHasNoModel(Conflict):
    """The plan has no pruned model: it has not succeeded, or it chose widths without weights."""

    code = "plan_has_no_model"


class PlanNotSucceeded(Conflict):
    """The plan has no result to show yet, or never will: it is queued, running or failed."""

    code = "plan_not_succeeded"


def planner_options(options: PlanOptions) -> PlannerOptions:
    """The planner's options for the API's: the mode by its planner name, and every field both have."""
    from lpnet.gates.planner import PlanOptions as PlannerOptions

    shared = ({f.name for f in dataclasses.fields(PlannerOptions)} & set(PlanOptions.model_fields)) - {"mode"}
    return PlannerOptions(
        mode=PlanMode.named(options.mode), **{name: getattr(options, name) for name in shared}
    )


def check_verify_allowed(key: ApiKey, device: Device) -> None:
    """Refuse ``verify`` on a local device to keys other than admin keys.

    Verifying on a local device times networks on the server's own machine, which only an admin may
    spend; a remote device's agent measures on the device itself.

    Raises:
        PermissionDenied: A non-admin key asking to verify on a local device.
    """
    if device.is_local and key.scope != KeyScope.ADMIN:
        raise PermissionDenied(
            f"verify on local device {device.name!r} measures on the server's own machine and needs an admin "
            f"key; API key {key.prefix} has scope {key.scope!r}. Plan without verify, or verify on a remote "
            "device (its agent measures)",
            {"scope": key.scope, "needed": KeyScope.ADMIN.value, "option": "verify", "device": device.name},
        )


def check_plan_request(
    session: Session, latency: LatencyService, spec: PlanCreate, key: ApiKey
) -> tuple[Device, int, Network]:
    """Everything about a plan request that can be checked without planning.

    Returns:
        The device, the id of the predictor to plan with, and the network.

    Raises:
        NotFound: Unknown device or model.
        PermissionDenied: ``verify`` on a local device without an admin key.
        NoPredictor: The device has no predictor yet.
        InvalidPlanOptions: A mode without what it needs, or options it does not use.
        InvalidInput: Weights for another network.
        BudgetInfeasible: The budget is below the predicted latency at minimum widths.
        NoPrunableGroups: Nothing in the network can be pruned.
    """
    from lpnet.arch.groups import channel_layout
    from lpnet.errors import NoPrunableGroups
    from lpnet.gates.budget import check_feasible, width_grid

    options = spec.options
    device = resolve_device(session, spec.device)
    if options.verify:
        check_verify_allowed(key, device)
    predictor = current_predictor(session, device)
    if options.mode == "weights" and options.model_id is None:
        raise InvalidPlanOptions(
            "the weights mode needs options.model_id: upload weights with POST /v1/models"
        )
    if options.mode == "architecture" and options.model_id is not None:
        raise InvalidPlanOptions("options.model_id is only used by the weights mode; set mode to 'weights'")
    network = latency.network(spec.architecture)
    if options.model_id is not None:
        upload = get_model_upload(session, options.model_id)
        if upload.architecture is not None:
            uploaded_hash = Network.model_validate(upload.architecture).content_hash
            if uploaded_hash != network.content_hash:
                raise InvalidInput(
                    f"model {upload.id} ({upload.name!r}) was uploaded for another architecture than the one "
                    "in this plan request",
                    {"model_id": upload.id},
                )
    layout = channel_layout(network)
    if not layout.groups:
        raise NoPrunableGroups(
            f"network {network.name or network.content_hash[:12]!r} has no prunable channel groups"
        )
    model = latency.predictor(session, predictor.id)
    tn = latency.tensorized_with_groups(network)
    # Feasible down to the grid's floor: under the allocation band's minimum a plan warns, not fails.
    planner = planner_options(options)
    grid = width_grid(layout, planner.round_to, planner.band_policy.grid_floor_ratio)
    check_feasible(grid, lambda widths: model.latency(tn, widths), spec.budget_ms)
    return device, predictor.id, network


def check_plan_quota(session: Session, key: ApiKey, quota: QuotaSettings, *, counted: bool) -> None:
    """Refuse a plan request beyond the key's quota; admin keys are exempt.

    Args:
        counted: Whether the request's own job is stored already (and so among the counted plans).

    Raises:
        QuotaExceeded: Too many of the key's plans are queued or running, or it requested too many in
            the last hour; ``Retry-After`` says when to try again.
    """
    if key.scope == KeyScope.ADMIN:
        return
    new = 0 if counted else 1
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.key_id == key.id,
            Job.kind == JobKind.PLAN,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
    )
    active = int(active or 0)
    if active + new > quota.active_plans:
        raise QuotaExceeded(
            f"API key {key.prefix} has {active - 1 + new} plan(s) queued or running, and a reader key may "
            f"have at most {quota.active_plans} at once (LPNET_QUOTA__ACTIVE_PLANS); wait for one to finish "
            "(GET /v1/plans/{id})",
            {"limit": "active_plans", "allowed": quota.active_plans, "count": active - 1 + new},
            ACTIVE_PLANS_RETRY_SECONDS,
        )
    now = utcnow()
    in_window = session.scalars(
        select(Job.created_at)
        .where(Job.key_id == key.id, Job.kind == JobKind.PLAN, Job.created_at > now - QUOTA_WINDOW)
        .order_by(Job.created_at)
    ).all()
    over = len(in_window) + new - quota.plans_per_hour
    if over > 0:
        # The request fits once `over` of the key's plans of the last hour have left the window.
        frees_at = in_window[over - 1] + QUOTA_WINDOW
        retry_after = max(1, math.ceil((frees_at - now).total_seconds()))
        count = len(in_window) - 1 + new
        raise QuotaExceeded(
            f"API key {key.prefix} requested {count} plan(s) in the last hour, and a reader key may request "
            f"at most {quota.plans_per_hour} an hour (LPNET_QUOTA__PLANS_PER_HOUR); retry in {retry_after} s",
            {"limit": "plans_per_hour", "allowed": quota.plans_per_hour, "count": count},
            retry_after,
        )


def _lock_key(session: Session, key: ApiKey) -> None:
    """Serialise the key's plan requests until the caller commits, so two cannot both take the last slot.

    PostgreSQL locks the key's row; on SQLite the job's insert that follows takes the database's write
    lock, which holds until commit.

    Raises:
        Unauthenticated: The key was deleted meanwhile.
    """
    locked = session.scalar(select(ApiKey.id).where(ApiKey.id == key.id).with_for_update())
    if locked is None:
        raise Unauthenticated(f"API key {key.prefix} no longer exists")


def request_plan(
    session: Session, latency: LatencyService, spec: PlanCreate, key: ApiKey, settings: Settings
) -> Job:
    """Check a plan request against the key's quota and queue its job (the caller commits).

    Raises:
        QuotaExceeded: The key is at its quota (checked before the costlier checks of the request,
            and again, exactly, once its job is stored).
        PermissionDenied, NotFound, NoPredictor, InvalidPlanOptions, InvalidInput, BudgetInfeasible,
            NoPrunableGroups: See `check_plan_request`.
    """
    check_plan_quota(session, key, settings.quota, counted=False)
    device, predictor_id, network = check_plan_request(session, latency, spec, key)
    if key.scope != KeyScope.ADMIN:
        _lock_key(session, key)
    job = enqueue(
        session,
        JobKind.PLAN,
        {
            "predictor_id": predictor_id,
            "budget_ms": spec.budget_ms,
            "options": spec.options.model_dump(mode="json"),
            "architecture": network.model_dump(mode="json"),
        },
        device_id=device.id,
        max_attempts=settings.worker.max_attempts,
        key_id=key.id,
        timeout_seconds=settings.worker.plan_timeout_seconds,
    )
    check_plan_quota(session, key, settings.quota, counted=True)
    return job


def get_plan(session: Session, plan_id: int) -> Job:
    """Return plan `plan_id`.

    Raises:
        NotFound: No such plan.
    """
    return get_job(session, plan_id, kind=JobKind.PLAN)


PLAN_LIST = Keyset("plans", Job.id, descending=True)


def list_plans(
    session: Session,
    key: ApiKey,
    page: PageRequest,
    *,
    device: Device | None = None,
    status: JobStatus | None = None,
) -> Page[PlanRead]:
    """A page of the plans `key` requested, newest first, of one device and in one status if given."""
    query = (
        select(Job).where(Job.kind == JobKind.PLAN, Job.key_id == key.id).options(selectinload(Job.device))
    )
    if device is not None:
        query = query.where(Job.device_id == device.id)
    if status is not None:
        query = query.where(Job.status == status)
    filters = {"key": key.id, "device": device.id if device is not None else None, "status": status}
    return paginate(session, query, PLAN_LIST, page, filters).map(lambda jobs: list(map(describe_plan, jobs)))


def describe_plan(job: Job) -> PlanRead:
    """A plan job as clients see it."""
    return PlanRead(
        id=job.id,
        status=JobStatus(job.status),
        device_id=job.device_id,
        allocator=AllocatorRead.of(job.device.allocator) if job.device is not None else None,
        budget_ms=float(job.input.get("budget_ms", 0.0)),
        options=dict(job.input.get("options", {})),
        progress=job.progress,
        result=job.result,
        error=job.error,
        created_at=job.created_at,
        deadline_at=job.deadline_at,
        finished_at=job.finished_at,
    )


def plan_layers_png(session: Session, plan_id: int) -> bytes:
    """The per-layer chart of a succeeded plan: predicted latency and kept output channels of each
    layer, before and after pruning (`lpnet.gates.chart.plan_layers_chart`), as PNG bytes.

    Raises:
        NotFound: No such plan.
        PlanNotSucceeded: The plan is queued, running or failed.
    """
    from lpnet.gates.chart import plan_chart_summary, plan_layer_rows, plan_layers_chart

    job = get_plan(session, plan_id)
    if job.status != JobStatus.SUCCEEDED or job.result is None:
        what = (
            f"plan {plan_id} failed, so it has no per-layer chart; GET /v1/plans/{plan_id} has its error"
            if job.status == JobStatus.FAILED
            else f"plan {plan_id} is {job.status}; its per-layer chart exists once it has succeeded "
            f"(poll GET /v1/plans/{plan_id})"
        )
        raise PlanNotSucceeded(what, {"plan_id": plan_id, "status": job.status})
    result = PlanResultRead.model_validate(job.result)
    return plan_layers_chart(plan_layer_rows(result), plan_chart_summary(result))


def pruned_plan_model(session: Session, plan_id: int) -> PrunedModel:
    """The uploaded weights of a succeeded weights-mode plan, pruned to the filters it kept.

    Raises:
        NotFound: No such plan, or its uploaded weights are gone.
        PlanHasNoModel: The plan has not succeeded, or it was made in another mode than weights.
    """
    from lpnet.pruning import module_with_weights, prune_module

    job = get_plan(session, plan_id)
    options = PlanOptions.model_validate(job.input.get("options", {}))
    if options.mode != "weights" or options.model_id is None:
        raise PlanHasNoModel(
            f"plan {plan_id} was made in mode {options.mode!r}, which chooses widths without weights; "
            "a pruned model comes from a plan with mode 'weights' and uploaded weights (options.model_id)",
            {"plan_id": plan_id, "mode": options.mode},
        )
    if job.status != JobStatus.SUCCEEDED or job.result is None:
        raise PlanHasNoModel(
            f"plan {plan_id} is {job.status}; its pruned model exists once it has succeeded",
            {"plan_id": plan_id, "status": job.status},
        )
    network = Network.model_validate(job.input["architecture"])
    module = module_with_weights(network, load_weights(session, options.model_id))
    kept = [group["kept_indices"] for group in job.result["groups"]]
    return prune_module(module, network, job.result["widths"], kept)


def plan_model_bytes(session: Session, plan_id: int, model_format: PlanModelFormat) -> bytes:
    """`pruned_plan_model` serialised: safetensors with the pruned IR in its header, or ONNX.

    Raises:
        NotFound: No such plan, or its uploaded weights are gone.
        PlanHasNoModel: The plan has not succeeded, or it was made in another mode than weights.
    """
    from lpnet.pruning import dump_pruned, export_pruned_onnx

    pruned = pruned_plan_model(session, plan_id)
    return export_pruned_onnx(pruned) if model_format == "onnx" else dump_pruned(pruned)


def local_measure(device: Device, nominal_probe_ms: float | None = None) -> MeasureFn:
    """Measures a network on this machine with the device's backend settings and allocator policy.

    With `nominal_probe_ms` (the speed the device's predictor was trained at, when its profile was
    speed-probed) every sample is timed against the speed probe and the latency is judged at that
    nominal speed, the raw median reported beside it; without one, the raw median is judged.

    Raises:
        AllocatorPolicyUnavailable: The device's policy is system and this process keeps freed memory
            already (it measured a retain device), or its policy is retain and glibc cannot.
    """
    from profiler.device import DeviceSpec
    from profiler.environment import AllocatorPolicy, apply_allocator_policy
    from profiler.protocol import TimingProtocol
    from profiler.verification import NetworkMeter

    # The device's profiles were measured under its policy; its plans are verified under it too.
    apply_allocator_policy(AllocatorPolicy(device.allocator))
    spec = DeviceSpec(
        hardware=device.hardware,
        backend=device.backend,
        threads=device.threads,
        batch_size=device.batch_size,
        dtype=device.dtype,
    )
    backend = spec.create_backend()
    if nominal_probe_ms is None:
        return NetworkMeter(backend, TimingProtocol(), spec.batch_size)
    return NetworkMeter.probed(backend, TimingProtocol(), spec.batch_size, nominal_probe_ms)


def _verify_measure(device: Device, context: JobContext, nominal_probe_ms: float | None) -> MeasureFn:
    """Measure on this machine for a local device; a remote device's agent measures through tasks."""
    if device.is_local:
        meter = local_measure(device, nominal_probe_ms)

        def measure(network: Network) -> float | MeasuredLatency:
            context.check()  # stops at the deadline between timings
            return meter(network)

        return measure
    # The worker's settings: how long it waits for the agent, and with which timing protocol.
    return remote_measure(context, device, get_settings().agent, nominal_probe_ms)


def run_plan_job(job: ClaimedJob, context: JobContext) -> TaskOutcome:
    """The plan task: load predictor, network and weights, plan, store the result.

    A plan verified on a remote device is deferred while the device's agent measures (see
    `service.agents.verify.remote_measure`); resumed, it plans again from the start with the
    measurements it has, and its progress keeps saying what it waits for meanwhile.
    """
    from lpnet.gates.planner import plan

    options = PlanOptions.model_validate(job.input.get("options", {}))
    budget_ms = float(job.input["budget_ms"])
    network = Network.model_validate(job.input["architecture"])
    if not job.resumed:
        context.progress("loading", 0.0, message="loading the predictor", force=True)
    with context.factory() as session:
        predictor_id = int(job.input["predictor_id"])
        predictor = load_predictor_artifact(session, predictor_id)
        weights = load_weights(session, options.model_id) if options.model_id is not None else None
        device = session.get(Device, job.device_id) if job.device_id is not None else None
        measure = None
        if options.verify and device is not None:
            measure = _verify_measure(device, context, predictor_nominal_probe_ms(session, predictor_id))
    if not job.resumed:
        context.progress("planning", 10.0, message=f"planning for {budget_ms:g} ms", force=True)
    started = time.perf_counter()
    result = plan(network, predictor, budget_ms, planner_options(options), weights=weights, measure=measure)
    context.check()
    payload: dict[str, Any] = json_safe(result.to_dict())
    payload["predictor_id"] = int(job.input["predictor_id"])
    logger.info("plan %d done in %.1f s", job.id, time.perf_counter() - started)
    return TaskOutcome(result=payload)


def plan_failed(factory: sessionmaker[Session], job: ClaimedJob, error: str) -> None:
    """Cancel what a failed plan asked remote agents to measure and they have not measured yet."""
    cancel_verify_tasks(factory, job.id, f"plan {job.id} failed: {error}")
