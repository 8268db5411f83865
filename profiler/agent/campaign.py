"""A profile campaign task: measure a device's samples into the server, resuming where it stopped.

The rows go through `HttpSink` (journal, idempotency keys, disk spool); sample keys the server already
holds are skipped. The campaign completes only once every spooled batch reached the server.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profiler.agent.client import ServerClient, ServerUnreachable
from profiler.agent.config import MAX_RETRY_WAIT_S
from profiler.agent.heartbeat import Heartbeat, TaskLost
from profiler.agent.host import TaskHost

if TYPE_CHECKING:
    from profiler.agent.options import AgentOptions
    from profiler.backends.base import Backend
    from profiler.batch import Measurement, RunContext
    from profiler.device import DeviceSpec
    from profiler.protocol import TimingProtocol
    from profiler.runner import RunSummary
    from profiler.sampling import StratifiedSampler
    from profiler.sinks import HttpSink, MeasurementSink

logger = logging.getLogger(__name__)

# A campaign logs its progress at most this often.
LOG_INTERVAL_S = 20.0


class KnownKeysSink:
    """A sink whose `done_keys` also counts sample keys the server already holds."""

    def __init__(self, sink: MeasurementSink, known: set[str]) -> None:
        self._sink = sink
        self._known = known

    def done_keys(self) -> set[str]:
        return self._sink.done_keys() | self._known

    def write(self, measurement: Measurement) -> None:
        self._sink.write(measurement)

    def close(self) -> None:
        self._sink.close()


@dataclass
class CampaignProgress:
    """Counts a campaign's measurements into the heartbeat's progress; stops the run if the task is lost."""

    task_id: int
    heartbeat: Heartbeat
    planned: int | None
    budget_seconds: float | None
    elapsed_before: float = 0.0
    measured_before: int = 0
    failed_before: int = 0
    measured: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_log: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[str, Any]:
        elapsed = self.elapsed_before + time.monotonic() - self.started
        measured = self.measured_before + self.measured
        progress: dict[str, Any] = {
            "measured": measured,
            "failed": self.failed_before + self.failed,
            "elapsed_seconds": round(elapsed, 2),
        }
        estimates: list[tuple[float, float]] = []
        if self.budget_seconds:
            estimates.append((100.0 * elapsed / self.budget_seconds, max(0.0, self.budget_seconds - elapsed)))
        if self.planned and measured:
            share = min(1.0, measured / self.planned)
            estimates.append((100.0 * share, elapsed / measured * max(0, self.planned - measured)))
        if estimates:
            percent, eta = max(estimates, key=lambda pair: pair[0])
            progress["percent"] = round(min(100.0, percent), 1)
            progress["eta_seconds"] = round(eta, 1)
        return progress

    def __call__(self, measurement: Measurement) -> None:
        self.measured += 1
        self.failed += measurement.status != "ok"
        self.heartbeat.progress = self.snapshot()
        if self.heartbeat.lost.is_set():
            raise TaskLost(self.heartbeat.reason)
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            progress = self.heartbeat.progress
            logger.info(
                "campaign %d: %d measured, %s%% done, about %s s left",
                self.task_id,
                progress["measured"],
                progress.get("percent", "?"),
                progress.get("eta_seconds", "?"),
            )


@dataclass
class CampaignSetup:
    """A campaign's payload turned into what measures it on this device."""

    options: AgentOptions
    spec: DeviceSpec
    backend: Backend
    protocol: TimingProtocol
    sampler: StratifiedSampler
    # The campaign's budget in minutes, and what is left of it after earlier attempts (None: counts only).
    budget: float | None
    remaining: float | None
    previous: dict[str, Any]


def run_campaign(host: TaskHost, task: dict[str, Any]) -> None:
    """Measure the campaign's samples into the server; complete it once every batch is delivered."""
    from profiler.runner import make_run_context

    setup = campaign_setup(host, task)
    if setup is None:
        return
    context = make_run_context(setup.spec, setup.protocol, setup.backend)
    sink = campaign_sink(host, context)
    known = server_sample_keys(host.server)
    heartbeat = host.start_heartbeat(task)
    tracker = CampaignProgress(
        task_id=int(task["id"]),
        heartbeat=heartbeat,
        planned=setup.sampler.planned_total() if setup.budget is None else None,
        budget_seconds=None if setup.budget is None else float(setup.budget) * 60.0,
        elapsed_before=float(setup.previous.get("elapsed_seconds", 0.0)),
        measured_before=int(setup.previous.get("measured", 0)),
        failed_before=int(setup.previous.get("failed", 0)),
    )
    heartbeat.progress = tracker.snapshot()
    logger.info(
        "campaign %d: families %s, %s; %d sample key(s) already on the server",
        task["id"],
        ",".join(setup.options.families),
        f"{setup.remaining:.1f} of {setup.budget:g} min left"
        if setup.remaining is not None and setup.budget is not None
        else "until the counts are done",
        len(known),
    )
    summary = _measure(host, setup, KnownKeysSink(sink, known), sink, tracker)
    deliver_spool(host, context, sink)
    progress = tracker.snapshot()
    result = {
        "measured": progress["measured"],
        "failed": progress["failed"],
        "skipped": summary.skipped if summary is not None else 0,
        "seconds": progress["elapsed_seconds"],
        "rejected_batches": sink.rejected_batches,
    }
    logger.info(
        "campaign %d done: %d measured in all, %d failed", task["id"], result["measured"], result["failed"]
    )
    host.finish(task, "complete", {"result": result})


def campaign_setup(host: TaskHost, task: dict[str, Any]) -> CampaignSetup | None:
    """The campaign's options on this device, the process put under the device's allocator policy.

    None after failing the task when the campaign cannot run here (under that policy included).
    """
    from lpnet.errors import LpnetError
    from profiler.agent.options import AgentOptions, build_sampler
    from profiler.batch import MeasurementKind
    from profiler.environment import apply_allocator_policy

    payload = task["payload"]
    previous = task.get("progress") or {}
    budget = payload.get("budget_minutes")
    remaining = None if budget is None else float(budget) - float(previous.get("elapsed_seconds", 0.0)) / 60.0
    try:
        spec = host.device_spec()
        options = AgentOptions(
            families=list(payload["families"]),
            kinds=[MeasurementKind(kind) for kind in payload["kinds"]],
            backend=spec.backend,
            threads=spec.threads,
            batch_size=spec.batch_size,
            dtype=spec.dtype,
            hardware=spec.hardware,
            image_size=int(payload["image_size"]),
            budget_minutes=remaining,
            network_samples=payload.get("network_samples"),
            in_context_samples=payload.get("in_context_samples"),
            isolated_samples=payload.get("isolated_samples"),
            seed=int(payload.get("seed", 0)),
            quick_protocol=bool(payload.get("quick", False)),
            allocator=host.allocator_policy(),
            progress=False,
        )
        # Before the run's context is fingerprinted: its batches state the policy they ran under.
        apply_allocator_policy(options.allocator)
        backend = host.backend(spec)
        protocol = options.protocol()
        sampler = build_sampler(options, spec)
    except (LpnetError, KeyError, ValueError) as exc:
        host.finish(task, "fail", {"error": f"cannot run this campaign here: {exc}"})
        return None
    return CampaignSetup(options, spec, backend, protocol, sampler, budget, remaining, previous)


def _measure(
    host: TaskHost,
    setup: CampaignSetup,
    measured_into: MeasurementSink,
    sink: HttpSink,
    tracker: CampaignProgress,
) -> RunSummary | None:
    """Run the profile (unless the budget is spent); KeyboardInterrupt when the agent is stopping."""
    from profiler.runner import run_profile

    def on_measurement(measurement: Measurement) -> None:
        tracker(measurement)
        # The signal handler's KeyboardInterrupt is lost when it lands in a finalizer or a
        # garbage-collector callback; the stop flag it set is not.
        if host.stop.is_set():
            raise KeyboardInterrupt

    summary = None
    try:
        if setup.remaining is None or setup.remaining > 0:
            summary = run_profile(
                setup.spec,
                setup.sampler,
                measured_into,
                setup.protocol,
                budget_minutes=setup.options.budget_minutes,
                progress=False,
                backend=setup.backend,
                on_measurement=on_measurement,
                seconds_per_process=setup.options.seconds_per_process,
            )
    finally:
        tracker.heartbeat.stop()
        if host.stop.is_set() or (summary is not None and summary.interrupted):
            sink.offline = True  # stopping: one delivery attempt per batch, the rest waits on disk
        sink.close()
    if summary is not None and summary.interrupted:
        raise KeyboardInterrupt
    return summary


def _safe_name(text: str) -> str:
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:60] + "-" + digest


def spool_dir(host: TaskHost) -> Path:
    """Where the device's undelivered batches wait, per server and device."""
    return host.state_dir / "spool" / f"{_safe_name(host.config.server)}-device-{host.device['id']}"


def campaign_sink(host: TaskHost, context: RunContext, flush_on_start: bool = True) -> HttpSink:
    """The sink posting the campaign's rows to the device's profiles, spooling what cannot go yet."""
    from profiler.sinks import HttpSink

    return HttpSink(
        host.config.server,
        str(host.device["id"]),
        host.server.token,
        context,
        spool_dir(host),
        batch_size=host.config.batch_rows,
        timeout=host.config.request_timeout,
        # The agent itself retries spooled batches; the sink need not wait long for each.
        max_retries=2,
        max_backoff_seconds=5.0,
        flush_on_start=flush_on_start,
    )


def pending_batches(host: TaskHost) -> int:
    return len(list((spool_dir(host) / "pending").glob("*.json")))


def deliver_spool(host: TaskHost, context: RunContext, sink: HttpSink) -> None:
    """Wait until every spooled batch reached the server (a campaign completes only then)."""
    wait = host.config.poll_seconds
    while pending_batches(host):
        logger.warning(
            "%d batch(es) wait in %s for the server; retrying in %.1f s",
            pending_batches(host),
            spool_dir(host),
            wait,
        )
        time.sleep(wait)
        wait = min(MAX_RETRY_WAIT_S, wait * 2)
        retry = campaign_sink(host, context)  # delivers the pending batches as it opens
        retry.close()
        sink.rejected_batches += retry.rejected_batches


def server_sample_keys(server: ServerClient) -> set[str]:
    """The sample keys the server already holds for the device; empty when it cannot be asked."""
    try:
        answer = server.call("GET", "/v1/agent/sample-keys").json()
    except ServerUnreachable as exc:
        logger.warning("could not ask which samples the server has (%s); relying on the local journal", exc)
        return set()
    return set(answer["sample_keys"])
