"""Pruning plans: checked when requested, computed by a job with the planner in `lpnet.gates`.

What can be checked at once is checked when the plan is requested, so a client hears about an unknown
device, a device without a predictor, an unreachable budget or missing weights with a 4xx rather than
a failed job: the budget check is one predictor call with every group at its minimum width.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from lpnet.arch.ir import Network
from lpnet.gates.errors import InvalidPlanOptions
from service.db.models import Device, Job, JobStatus
from service.devices import resolve_device
from service.errors import InvalidInput
from service.jobs.queue import ClaimedJob, TaskOutcome, enqueue, get_job
from service.latency import LatencyService
from service.predictors import (
    current_predictor,
    json_safe,
    load_predictor_artifact,
    predictor_nominal_probe_ms,
)
from service.schemas.plans import PlanCreate, PlanOptions, PlanRead
from service.uploads import get_model_upload, load_weights

if TYPE_CHECKING:
    from lpnet.gates.planner import MeasureFn
    from lpnet.gates.planner import PlanOptions as PlannerOptions
    from service.jobs.worker import JobContext

logger = logging.getLogger(__name__)

PLAN_JOB = "plan"
# API mode names -> the planner's.
PLANNER_MODES = {"architecture": "architecture-only", "weights": "weights", "train": "train"}


def planner_options(options: PlanOptions) -> PlannerOptions:
    """The planner's options for the API's."""
    from lpnet.gates.planner import PlanMode
    from lpnet.gates.planner import PlanOptions as PlannerOptions

    return PlannerOptions(
        mode=PlanMode(PLANNER_MODES[options.mode]),
        round_to=options.round_to,
        min_keep_ratio=options.min_keep_ratio,
    )


def check_plan_request(
    session: Session, latency: LatencyService, spec: PlanCreate
) -> tuple[Device, int, Network]:
    """Everything about a plan request that can be checked without planning.

    Returns:
        The device, the id of the predictor to plan with, and the network.

    Raises:
        NotFound: Unknown device or model.
        NoPredictor: The device has no predictor yet.
        InvalidPlanOptions: A mode the API cannot run, or a mode without what it needs.
        InvalidInput: Weights for another network.
        BudgetInfeasible: The budget is below the predicted latency at minimum widths.
        NoPrunableGroups: Nothing in the network can be pruned.
    """
    from lpnet.arch.groups import channel_layout
    from lpnet.gates.budget import check_feasible, width_grid
    from lpnet.gates.errors import NoPrunableGroups

    options = spec.options
    device = resolve_device(session, spec.device)
    predictor = current_predictor(session, device)
    if options.mode == "train":
        raise InvalidPlanOptions(
            "the train mode trains W-Gates together with the network on a dataset, which a plan request "
            "cannot carry; use mode 'weights' with uploaded weights, or lpnet.gates.training in Python"
        )
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
    grid = width_grid(layout, options.round_to, options.min_keep_ratio)
    check_feasible(grid, lambda widths: model.latency(tn, widths), spec.budget_ms)
    return device, predictor.id, network


def request_plan(session: Session, latency: LatencyService, spec: PlanCreate, max_attempts: int) -> Job:
    """Check a plan request and queue its job (the caller commits)."""
    device, predictor_id, network = check_plan_request(session, latency, spec)
    return enqueue(
        session,
        PLAN_JOB,
        {
            "predictor_id": predictor_id,
            "budget_ms": spec.budget_ms,
            "options": spec.options.model_dump(mode="json"),
            "architecture": network.model_dump(mode="json"),
        },
        device_id=device.id,
        max_attempts=max_attempts,
    )


def get_plan(session: Session, plan_id: int) -> Job:
    """Return plan `plan_id`.

    Raises:
        NotFound: No such plan.
    """
    return get_job(session, plan_id, kind=PLAN_JOB)


def describe_plan(job: Job) -> PlanRead:
    """A plan job as clients see it."""
    return PlanRead(
        id=job.id,
        status=JobStatus(job.status),
        device_id=job.device_id,
        budget_ms=float(job.input.get("budget_ms", 0.0)),
        options=dict(job.input.get("options", {})),
        progress=job.progress,
        result=job.result,
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


def local_measure(device: Device, nominal_probe_ms: float | None = None) -> MeasureFn:
    """Measures a network on this machine with the device's backend settings.

    With `nominal_probe_ms` (the speed the device's predictor was trained at, when its profile was
    speed-probed) every sample is timed against the speed probe and the latency is judged at that
    nominal speed, the raw median reported beside it; without one, the raw median is judged.
    """
    from profiler.device import DeviceSpec
    from profiler.environment import retain_freed_memory
    from profiler.protocol import TimingProtocol
    from profiler.verification import NetworkMeter

    # Profiles keep freed memory in-process (the profiler's default); measure under the same policy.
    retain_freed_memory()
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
        return local_measure(device, nominal_probe_ms)
    from service.agent_tasks import remote_measure
    from service.config import get_settings

    # The worker's settings: how long it waits for the agent, and with which timing protocol.
    return remote_measure(context, device, get_settings().agent, nominal_probe_ms)


def run_plan_job(job: ClaimedJob, context: JobContext) -> TaskOutcome:
    """The plan task: load predictor, network and weights, plan, store the result."""
    from lpnet.gates.planner import plan

    options = PlanOptions.model_validate(job.input.get("options", {}))
    budget_ms = float(job.input["budget_ms"])
    network = Network.model_validate(job.input["architecture"])
    context.progress("loading", 0.0, message="loading the predictor", force=True)
    with context.factory() as session:
        predictor_id = int(job.input["predictor_id"])
        predictor = load_predictor_artifact(session, predictor_id)
        weights = load_weights(session, options.model_id) if options.model_id is not None else None
        device = session.get(Device, job.device_id) if job.device_id is not None else None
        measure = None
        if options.verify and device is not None:
            measure = _verify_measure(device, context, predictor_nominal_probe_ms(session, predictor_id))
    context.progress("planning", 10.0, message=f"planning for {budget_ms:g} ms", force=True)
    started = time.perf_counter()
    result = plan(network, predictor, budget_ms, planner_options(options), weights=weights, measure=measure)
    context.check()
    payload: dict[str, Any] = json_safe(result.to_dict())
    payload["predictor_id"] = int(job.input["predictor_id"])
    logger.info("plan %d done in %.1f s", job.id, time.perf_counter() - started)
    return TaskOutcome(result=payload)
