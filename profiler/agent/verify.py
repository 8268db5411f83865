"""A verify task: measure one whole network for a plan and send its median latency."""

from __future__ import annotations

import logging
import time
from typing import Any

from profiler.agent.host import TaskHost

logger = logging.getLogger(__name__)


def run_verify(host: TaskHost, task: dict[str, Any]) -> None:
    """Measure the task's network on this device under its allocator policy; complete the task with it.

    On a CPU backend every sample is timed between two speed-probe runs, as profiles are, so the
    server can judge the result at the speed its predictor was fitted at.
    """
    from lpnet.arch.ir import Network
    from lpnet.errors import LpnetError
    from profiler.environment import apply_allocator_policy
    from profiler.measure import measure_network
    from profiler.protocol import TimingProtocol
    from profiler.speed import PROBE_VERSION, SpeedProbe

    payload = task["payload"]
    try:
        network = Network.model_validate(payload["architecture"])
        protocol = TimingProtocol.model_validate(payload["protocol"])
        spec = host.device_spec()
        apply_allocator_policy(host.allocator_policy())  # the policy the device's latencies hold under
        backend = host.backend(spec)
    except (LpnetError, KeyError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        host.finish(task, "fail", {"error": f"cannot verify here: {exc}"})
        return
    heartbeat = host.start_heartbeat(task)
    heartbeat.progress = {"phase": "measuring", "network_hash": network.content_hash}
    started = time.perf_counter()
    probe = SpeedProbe().run if backend.runs_on_cpu else None
    try:
        timing = measure_network(network, backend, protocol, spec.batch_size, probe=probe)
    except Exception as exc:  # any failure to run the network is the task's failure, not the agent's
        host.finish(task, "fail", {"error": f"measuring the network failed: {type(exc).__name__}: {exc}"})
        return
    finally:
        heartbeat.stop()
    result = {
        "measured_ms": timing.median_ms,
        "p10_ms": timing.p10_ms,
        "p90_ms": timing.p90_ms,
        "repetitions": timing.repetitions,
        "network_hash": network.content_hash,
    }
    if timing.probe_ms is not None and timing.relative is not None:
        result |= {
            "probe_ms": timing.probe_ms,
            "relative_latency": timing.relative,
            "probe_version": PROBE_VERSION,
        }
    logger.info(
        "verify task %d: %.3f ms (%d repetitions, %.1f s)",
        task["id"],
        timing.median_ms,
        timing.repetitions,
        time.perf_counter() - started,
    )
    # Even if the lease lapsed meanwhile the server takes the result while nobody else holds the task.
    host.finish(task, "complete", {"result": result})
