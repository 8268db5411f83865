"""Scenario: a worker killed mid-plan; another worker takes the job over once its lease lapses."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from service.testing.processes import READY_TIMEOUT_S, Processes, ServedApi, lpnet_args, lpnet_env
from service.testing.stored import read_job


def _worker_pid(owner: str | None) -> int | None:
    """The process id in a lease owner ``host:pid:random``."""
    parts = (owner or "").split(":")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def _start_workers(
    api: ServedApi, processes: Processes, data_dir: Path, lease_seconds: float
) -> dict[str, subprocess.Popen[bytes]]:
    """Two `lpnet worker` processes with a short lease, started and polling (so either may take a job)."""
    settings = {
        "LPNET_WORKER__LEASE_SECONDS": str(lease_seconds),
        "LPNET_WORKER__POLL_SECONDS": "0.2",
        "LPNET_LOG_LEVEL": "INFO",
    }
    env = lpnet_env(api.database_url, data_dir, settings)
    workers = {name: processes.start(name, lpnet_args("worker"), env) for name in ("worker-a", "worker-b")}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all("started" in processes.log(name) for name in workers):
        for name, process in workers.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{processes.log(name)}")
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not start")
        time.sleep(0.1)
    return workers


def _wait_for_planning(
    database_url: str, job_id: int, worker_pids: set[int], deadline: float
) -> dict[str, Any]:
    """The job once one of the workers runs its optimisation itself (not while the predictor loads)."""
    while True:
        job = read_job(database_url, job_id)
        owned = job["status"] == "running" and _worker_pid(job["lease_owner"]) in worker_pids
        if owned and (job["progress"] or {}).get("phase") == "planning":
            return job
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            raise RuntimeError(f"the plan was never seen running: {job}")
        time.sleep(0.02)


def _wait_for_end(database_url: str, job_id: int, deadline: float) -> dict[str, Any]:
    """The job once it succeeded or failed."""
    while True:
        final = read_job(database_url, job_id)
        if final["status"] in ("succeeded", "failed"):
            return final
        if time.monotonic() > deadline:
            raise RuntimeError(f"the plan did not finish by its deadline after the kill: {final}")
        time.sleep(0.1)


def _freeze_owner(
    database_url: str, job_id: int, process: subprocess.Popen[bytes], victim_pid: int
) -> dict[str, Any]:
    """Stop `process` (SIGSTOP) and return the job as stored while it is frozen.

    Raises:
        RuntimeError: The job had ended or changed owner before the worker froze: the plan is too short
            to be killed in on this machine.
    """
    process.send_signal(signal.SIGSTOP)
    job = read_job(database_url, job_id)
    if job["status"] != "running" or _worker_pid(job["lease_owner"]) != victim_pid:
        process.send_signal(signal.SIGCONT)
        raise RuntimeError(f"the plan ended before its worker could be stopped; make it longer: {job}")
    return job


def worker_kill(
    api: ServedApi,
    processes: Processes,
    data_dir: Path,
    plan_request: dict[str, Any],
    *,
    lease_seconds: float = 2.0,
    timeout: float = 90.0,
) -> dict[str, Any]:
    """Two workers; the one that leased the plan is frozen as soon as it is seen planning, then SIGKILLed;
    the other must take the plan over once the lease lapses, and finish it.

    Freezing first means the job is known to be running on the victim at the moment of the kill, however
    fast this machine plans.

    Returns the job as stored at the end, the killed and surviving worker pids, and the times.
    """
    workers = _start_workers(api, processes, data_dir, lease_seconds)
    by_pid = {process.pid: name for name, process in workers.items()}
    with api.client() as client:
        accepted = client.post("/v1/plans", json=plan_request)
    if accepted.status_code != 202:
        raise RuntimeError(f"the plan was refused: {accepted.status_code} {accepted.text}")
    job_id = int(accepted.json()["job_id"])
    submitted = time.monotonic()

    deadline = submitted + timeout
    job = _wait_for_planning(api.database_url, job_id, set(by_pid), deadline)
    planning = time.monotonic()
    victim_pid = _worker_pid(job["lease_owner"])
    assert victim_pid is not None
    victim = by_pid[victim_pid]
    running_when_killed = _freeze_owner(api.database_url, job_id, workers[victim], victim_pid)
    workers[victim].send_signal(signal.SIGKILL)
    workers[victim].wait(10)
    processes.running.pop(victim)
    killed = time.monotonic()

    final = _wait_for_end(api.database_url, job_id, deadline)
    finished = time.monotonic()
    with api.client() as client:
        plan = client.get(f"/v1/plans/{job_id}").json()
    survivor_pid = _worker_pid(final["lease_owner"])
    survivor = by_pid.get(survivor_pid) if survivor_pid is not None else None
    survivor_exit = (
        processes.stop(survivor) if survivor is not None and survivor in processes.running else None
    )
    for name in workers:
        if name in processes.running:
            processes.stop(name)
    return {
        "job_id": job_id,
        "killed_worker_pid": victim_pid,
        "survivor_worker_pid": survivor_pid,
        "survivor_exit_code": survivor_exit,
        "worker_pids": sorted(by_pid),
        "status_when_killed": running_when_killed["status"],
        "progress_when_killed": running_when_killed["progress"],
        "job": final,
        "plan": plan,
        "lease_seconds": lease_seconds,
        "seconds_submit_to_planning": round(planning - submitted, 3),
        "seconds_kill_to_completion": round(finished - killed, 3),
    }
