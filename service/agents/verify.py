"""Plan verification on a remote device: its agent measures each pruned network through a verify task.

A plan with ``verify`` on a remote device measures through `remote_measure`: it queues a verify task
(`service.agents.tasks`) per pruned network and defers the plan job (no worker thread waits) until the
device's agent measured it; completing or failing the task wakes the plan, which then plans again from
the start and finds the measurements it has.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session, sessionmaker

from lpnet.arch.ir import Network
from lpnet.measurement import MeasuredLatency
from profiler.protocol import TimingProtocol
from profiler.speed import PROBE_VERSION
from service.agents.tasks import FINISHED_STATUSES, OPEN_STATUSES, cancel_task, cancel_tasks
from service.config import AgentSettings
from service.db.base import utcnow
from service.db.models import AgentTask, Device, TaskKind, TaskStatus
from service.errors import ServiceError
from service.jobs.context import JobContext
from service.jobs.queue import Deferred

if TYPE_CHECKING:
    # Only the type: the planner module imports onnx, which the service loads when it first needs it.
    from lpnet.measurement import MeasureFn

logger = logging.getLogger(__name__)

# A deferred plan looks at its open verify task again after a quarter of the time it has waited, within
# these bounds: an agent's completion wakes it at once (`service.agents.tasks.wake_plan`), so the recheck
# is for what nothing announces (a task failed by a lapsed lease, the verify timeout), and each recheck
# plans again.
VERIFY_RECHECK_MIN_SECONDS = 2.0
VERIFY_RECHECK_MAX_SECONDS = 60.0
# The progress phase of a plan deferred until its device's agent measured a network.
WAITING_FOR_AGENT = "waiting_for_agent"


class AgentTaskFailed(ServiceError):
    """A verify task the plan waited for failed or was cancelled."""

    code = "agent_task_failed"
    status_code = 502


class AgentTimeout(ServiceError):
    """No agent measured a verify task in time."""

    code = "agent_timeout"
    status_code = 504


def verify_protocol(settings: AgentSettings) -> TimingProtocol:
    """The timing protocol agents verify plans with."""
    return TimingProtocol.quick() if settings.verify_protocol == "quick" else TimingProtocol()


@dataclass(frozen=True)
class VerifyTaskState:
    """Where a verify task stands, read in one transaction."""

    id: int
    status: TaskStatus
    result: dict[str, Any] | None
    error: str | None
    lease_owner: str | None
    created_at: datetime


def verify_task_for(
    factory: sessionmaker[Session],
    job_id: int,
    device_id: int,
    network: Network,
    protocol: TimingProtocol,
    max_attempts: int,
) -> VerifyTaskState:
    """The plan job's verify task for `network` (by its content hash), queued now if it has none.

    Of the job's tasks for the network a succeeded one comes first (a resumed or retried plan reuses the
    measurement), then an open one, then the newest failed or cancelled one: the plan fails on it
    rather than asking again.
    """
    network_hash = network.content_hash
    with factory() as session:
        tasks = [
            task
            for task in session.scalars(
                select(AgentTask)
                .where(AgentTask.job_id == job_id, AgentTask.kind == TaskKind.VERIFY)
                .order_by(AgentTask.id.desc())
            )
            if task.payload.get("network_hash") == network_hash
        ]
        for wanted in ((TaskStatus.SUCCEEDED,), OPEN_STATUSES, FINISHED_STATUSES):
            task = next((t for t in tasks if t.status in wanted), None)
            if task is not None:
                return _verify_state(task)
        task = AgentTask(
            device_id=device_id,
            kind=TaskKind.VERIFY,
            job_id=job_id,
            payload={
                "architecture": network.model_dump(mode="json"),
                "network_hash": network_hash,
                "protocol": protocol.model_dump(mode="json"),
            },
            max_attempts=max_attempts,
        )
        session.add(task)
        session.commit()
        logger.info("plan %d: queued verify task %d for network %s", job_id, task.id, network_hash[:12])
        return _verify_state(task)


def _verify_state(task: AgentTask) -> VerifyTaskState:
    return VerifyTaskState(
        id=task.id,
        status=TaskStatus(task.status),
        result=dict(task.result) if task.result is not None else None,
        error=task.error,
        lease_owner=task.lease_owner,
        created_at=task.created_at,
    )


def cancel_verify_tasks(
    factory: sessionmaker[Session], job_id: int, reason: str, keep: Collection[int] = ()
) -> int:
    """Cancel the plan job's open verify tasks, except those in `keep`, in a transaction of their own.

    Returns:
        How many were cancelled.
    """
    job_verify_tasks = and_(
        AgentTask.job_id == job_id, AgentTask.kind == TaskKind.VERIFY, AgentTask.id.not_in(list(keep))
    )
    cancelled = cancel_tasks(factory, job_verify_tasks, reason)
    if cancelled:
        logger.info("plan %d: cancelled %d verify task(s): %s", job_id, cancelled, reason)
    return cancelled


def recheck_seconds(waited_seconds: float, timeout_seconds: float) -> float:
    """When a plan that has waited `waited_seconds` for a verify task looks at it again: later the longer
    it waited, and no later than the verify timeout."""
    delay = min(max(VERIFY_RECHECK_MIN_SECONDS, waited_seconds / 4), VERIFY_RECHECK_MAX_SECONDS)
    return min(delay, max(0.0, timeout_seconds - waited_seconds))


def verify_measurement(result: dict[str, Any], nominal_probe_ms: float | None) -> MeasuredLatency:
    """An agent's verify result as a verification measurement.

    Judged at `nominal_probe_ms` when the agent timed it against the current speed probe (the speed
    the device's predictor was fitted at), else on the raw median.
    """
    raw = float(result["measured_ms"])
    probe_ms, relative = result.get("probe_ms"), result.get("relative_latency")
    if probe_ms is None or relative is None or result.get("probe_version") != PROBE_VERSION:
        return MeasuredLatency(raw, raw)
    return MeasuredLatency.at_speed(raw, float(relative), float(probe_ms), nominal_probe_ms)


def remote_measure(
    context: JobContext, device: Device, settings: AgentSettings, nominal_probe_ms: float | None = None
) -> MeasureFn:
    """A `measure` for the planner that has the remote device's agent measure each network.

    No worker thread waits for the agent: a network the agent has not measured yet gets a verify task
    (one per job and network) and the plan job is deferred (`service.jobs.queue.Deferred`), showing
    progress phase ``waiting_for_agent``. Resumed, the plan plans again from the start and this measure
    answers at once for every network measured so far, up to the one still waiting. A replay that plans
    another network than before (the planner need not repeat itself exactly) asks for that network, and
    the tasks no longer needed are cancelled. A task still open `settings.verify_timeout_seconds` after it
    was queued is cancelled and the plan fails. With `nominal_probe_ms` the agent's probed timings are
    judged at that speed (`verify_measurement`).

    Raises (from the returned function):
        Deferred: The agent has not measured the network yet.
        AgentTaskFailed: The agent failed the task, or it was cancelled.
        AgentTimeout: Nobody measured it within the verify timeout.
    """
    protocol = verify_protocol(settings)
    rounds = itertools.count(1)
    used: set[int] = set()
    device_id, device_name = device.id, device.name
    timeout = settings.verify_timeout_seconds

    def measure(network: Network) -> MeasuredLatency:
        context.check()
        round_number = next(rounds)
        while True:
            task = verify_task_for(
                context.factory, context.job.id, device_id, network, protocol, settings.max_attempts
            )
            used.add(task.id)
            if task.status == TaskStatus.SUCCEEDED and task.result is not None:
                return verify_measurement(task.result, nominal_probe_ms)
            if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                raise AgentTaskFailed(
                    f"the agent of device {device_name!r} did not measure the pruned network of round "
                    f"{round_number} (verify task {task.id} {task.status}): {task.error}",
                    {"task_id": task.id, "status": task.status},
                )
            waited = (utcnow() - task.created_at).total_seconds()
            if waited < timeout:
                break
            reason = f"the plan stopped waiting after {timeout:g} s"
            if cancel_task(context.factory, task.id, reason):
                holder = (
                    f"leased by agent {task.lease_owner}"
                    if task.status == TaskStatus.LEASED
                    else "never leased by an agent"
                )
                raise AgentTimeout(
                    f"no agent of device {device_name!r} measured the pruned network within {timeout:g} s "
                    f"(verify task {task.id} was {holder}); start `lpnet agent` for the device, raise "
                    "LPNET_AGENT__VERIFY_TIMEOUT_SECONDS, or plan without verify",
                    {"task_id": task.id, "timeout_seconds": timeout},
                )
            # It finished at the last moment: read it again.
        cancel_verify_tasks(
            context.factory, context.job.id, "the resumed plan measures another network instead", keep=used
        )
        raise Deferred(
            recheck_seconds(waited, timeout),
            WAITING_FOR_AGENT,
            f"round {round_number}: waiting for the agent of {device_name!r} to measure the pruned network "
            f"(verify task {task.id}, {task.status}, queued {waited:.0f} s ago)",
        )

    return measure
