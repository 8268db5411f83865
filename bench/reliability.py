"""Reliability under failure, on a real PostgreSQL: a killed worker, a restarted database, 20 submitters.

Three scenarios, each with real processes on loopback (`lpnet serve` and `lpnet worker` started as
subprocesses, clients in threads of this process):

- worker kill: two `lpnet worker` processes with a short lease; a plan job of a few seconds (resnet18
  at 64x64) is submitted, the worker that leased it is SIGKILLed while it plans, and the other worker
  takes the job over once the lease lapses and completes it;
- PostgreSQL restart under load: clients post profile batches through `profiler.sinks.HttpSink` (it
  retries with the same idempotency key and spools what it cannot deliver) while the cluster is
  restarted with ``pg_ctlcluster``; the API must report ready again and every batch must be stored
  exactly once;
- concurrent submitters: 20 agents (devices), each with two threads posting the same overlapping
  batches in opposite orders (a retry racing the original), then replaying every batch once more;
  every row must be stored exactly once and every replay must get the first answer back.

The measurements posted are real timings of a tiny residual network (tests/service/support.py), each
copied under many distinct sample keys: storage, not timing, is what these scenarios exercise.

tests/service/test_reliability.py runs the same scenarios at a small size and asserts on them;
``python -m bench.reliability`` runs them larger and prints and saves the figures to
bench/results/reliability.json. Restarting the cluster drops every connection to it, including those
of anything else using the server at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
from sqlalchemy import func, select, text

from profiler.batch import Measurement, MeasurementKind, ProfileBatch, RunContext
from profiler.sinks import HttpSink, batch_idempotency_key
from service.auth import create_api_key
from service.db.migrate import upgrade
from service.db.models import Job, KeyScope, NetworkMeasurement
from service.db.models import ProfileBatch as StoredBatch
from service.db.session import make_engine, make_session_factory

if TYPE_CHECKING:
    from service.predictors import FittedPredictor

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "reliability.json"
READY_TIMEOUT_S = 60.0
# Answers a submitter retries with the same idempotency key (409: concurrent inserts kept colliding).
RETRIED_STATUS = frozenset({409, 500, 502, 503, 504})


# Processes ------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def lpnet_env(database_url: str, data_dir: Path, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an `lpnet` subprocess: this one's without LPNET_* settings, plus the given ones.

    Scale-out defaults: no embedded worker, no first-run bootstrap.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPNET_") or k.startswith("LPNET_TEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        {
            "LPNET_DATABASE_URL": database_url,
            "LPNET_DATA_DIR": str(data_dir),
            "LPNET_WORKER__EMBEDDED": "false",
            "LPNET_FIRST_RUN__ENABLED": "false",
        }
    )
    env.update(settings or {})
    return env


def lpnet_args(*args: str) -> list[str]:
    """The `lpnet` command line run with this interpreter."""
    return [sys.executable, "-m", "service", *args]


class Processes:
    """Subprocesses with their output in log files; every one still running is stopped on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start `args` as `name`; stdout and stderr go to ``<log_dir>/<name>.log``."""
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        process = subprocess.Popen(list(args), env=dict(env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.running[name] = process
        return process

    def log(self, name: str, chars: int = 4000) -> str:
        """The end of a process's log, for failure messages."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, name: str, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        process = self.running.pop(name)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        return int(process.returncode)

    def close(self) -> None:
        for name in list(self.running):
            self.stop(name)
        for log in self._logs:
            log.close()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT_S) -> float:
    """Wait for ``/readyz`` to answer 200; returns the seconds waited.

    Raises:
        RuntimeError: The process exited, or it was not ready within `timeout`.
    """
    started = time.monotonic()
    with httpx.Client(timeout=2.0) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
            try:
                if client.get(f"{base_url}/readyz").status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{base_url}/readyz did not answer 200 within {timeout:.0f} s")
            time.sleep(0.1)


@dataclass
class Api:
    """A running `lpnet serve` on a migrated PostgreSQL database, with an admin key."""

    base_url: str
    database_url: str
    admin_key: str
    process: subprocess.Popen[bytes]

    def client(self, key: str | None = None, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {key or self.admin_key}"},
        )

    def register_device(self, name: str, context: RunContext, *, local: bool = False) -> tuple[int, str]:
        """Register a device with the spec `context` was measured with; returns its id and agent key."""
        spec = context.device
        body = {"name": name, **spec.to_dict(), "is_local": local}
        with self.client() as client:
            response = client.post("/v1/devices", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"registering {name} failed: {response.status_code} {response.text}")
        created = response.json()
        return int(created["id"]), str(created["agent_key"])


def admin_key_for(database_url: str) -> str:
    """Create an admin key directly in the database (as `lpnet keys create --scope admin` would)."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            key = create_api_key(session, scope=KeyScope.ADMIN.value, name="reliability")[1]
            session.commit()
    finally:
        engine.dispose()
    return key


@contextmanager
def running_api(
    processes: Processes, database_url: str, data_dir: Path, settings: Mapping[str, str] | None = None
) -> Iterator[Api]:
    """Migrate the database, create an admin key and run `lpnet serve` on a free loopback port."""
    upgrade(database_url, "head")
    admin = admin_key_for(database_url)
    port = free_port()
    env = lpnet_env(database_url, data_dir, {"LPNET_LOG_LEVEL": "WARNING", **(settings or {})})
    process = processes.start("serve", lpnet_args("serve", "--host", "127.0.0.1", "--port", str(port)), env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{processes.log('serve')}") from exc
    try:
        yield Api(base_url, database_url, admin, process)
    finally:
        if "serve" in processes.running:
            processes.stop("serve")


# Measurements ---------------------------------------------------------------------------------------


def replicate_rows(source: Sequence[Measurement], count: int, prefix: str) -> list[Measurement]:
    """`count` whole-network measurements copied from `source` under distinct sample keys."""
    networks = [m for m in source if m.kind is MeasurementKind.NETWORK and m.status == "ok"]
    if not networks:
        raise ValueError("no successful whole-network measurement to copy")
    return [
        networks[i % len(networks)].model_copy(update={"sample_key": f"{prefix}-{i:06d}"})
        for i in range(count)
    ]


def count_stored(database_url: str, device_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Per device: stored batches, network rows and distinct sample keys."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            counts: dict[int, dict[str, int]] = {}
            for device_id in device_ids:
                rows = select(NetworkMeasurement).where(NetworkMeasurement.device_id == device_id).subquery()
                counts[device_id] = {
                    "batches": int(
                        session.scalar(
                            select(func.count())
                            .select_from(StoredBatch)
                            .where(StoredBatch.device_id == device_id)
                        )
                        or 0
                    ),
                    "rows": int(session.scalar(select(func.count()).select_from(rows)) or 0),
                    "distinct_rows": int(
                        session.scalar(select(func.count(func.distinct(rows.c.sample_key)))) or 0
                    ),
                }
            return counts
    finally:
        engine.dispose()


def stored_keys(database_url: str, device_id: int) -> tuple[set[str], set[str]]:
    """The device's stored batch idempotency keys and network sample keys."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            batches = set(
                session.scalars(select(StoredBatch.idempotency_key).where(StoredBatch.device_id == device_id))
            )
            rows = set(
                session.scalars(
                    select(NetworkMeasurement.sample_key).where(NetworkMeasurement.device_id == device_id)
                )
            )
            return batches, rows
    finally:
        engine.dispose()


# PostgreSQL -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresCluster:
    """The local Debian-style PostgreSQL cluster, driven with ``pg_ctlcluster``."""

    version: str
    name: str = "main"

    @classmethod
    def find(cls) -> PostgresCluster | None:
        """The one cluster under /etc/postgresql, or None without pg_ctlcluster (or with no or several versions)."""
        if shutil.which("pg_ctlcluster") is None:
            return None
        config = Path("/etc/postgresql")
        versions = sorted(p.name for p in config.iterdir() if p.is_dir()) if config.is_dir() else []
        if len(versions) != 1 or not (config / versions[0] / "main").is_dir():
            return None
        return cls(versions[0])

    def ctl(self, action: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", *options, self.version, self.name, action],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def is_running(self) -> bool:
        # pg_ctlcluster status: 0 running, 3 not running.
        return self.ctl("status").returncode == 0

    def restart(self) -> None:
        """Restart with the fast shutdown mode (open connections are closed, not waited for)."""
        result = self.ctl("restart", "--mode", "fast")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctlcluster restart failed ({result.returncode}): {result.stderr.strip()}")

    def ensure_running(self) -> None:
        """Start the cluster unless it runs (a failed restart must not leave it down)."""
        if not self.is_running():
            self.ctl("start")


def postmaster_started(database_url: str) -> datetime:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            started: datetime = connection.execute(text("SELECT pg_postmaster_start_time()")).scalar_one()
            return started
    finally:
        engine.dispose()


# Scenario: a worker killed mid-plan -----------------------------------------------------------------


def _worker_pid(owner: str | None) -> int | None:
    """The process id in a lease owner ``host:pid:random``."""
    parts = (owner or "").split(":")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def _read_job(database_url: str, job_id: int) -> dict[str, Any]:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise RuntimeError(f"job {job_id} is gone")
            return {
                "status": str(job.status),
                "attempts": job.attempts,
                "lease_owner": job.lease_owner,
                "progress": job.progress,
                "result": job.result,
                "error": job.error,
            }
    finally:
        engine.dispose()


def store_device_predictor(database_url: str, device_id: int, fitted: FittedPredictor) -> int:
    """Store a fitted predictor for the device (as a finished fit job would); returns its id."""
    from service.predictors import store_predictor

    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            predictor = store_predictor(session, device_id, fitted)
            session.commit()
            return predictor.id
    finally:
        engine.dispose()


def worker_kill(
    api: Api,
    processes: Processes,
    data_dir: Path,
    plan_request: dict[str, Any],
    *,
    lease_seconds: float = 2.0,
    kill_after_seconds: float = 0.3,
    timeout: float = 90.0,
) -> dict[str, Any]:
    """Two workers; the one that leased the plan is SIGKILLed `kill_after_seconds` into its planning
    phase; the other must take it over once the lease lapses, and finish it.

    Returns the job as stored at the end, the killed and surviving worker pids, and the times.
    """
    settings = {
        "LPNET_WORKER__LEASE_SECONDS": str(lease_seconds),
        "LPNET_WORKER__POLL_SECONDS": "0.2",
        "LPNET_LOG_LEVEL": "INFO",
    }
    env = lpnet_env(api.database_url, data_dir, settings)
    workers = {name: processes.start(name, lpnet_args("worker"), env) for name in ("worker-a", "worker-b")}
    by_pid = {process.pid: name for name, process in workers.items()}
    # Both workers poll before the job exists, so either may take it.
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all("started" in processes.log(name) for name in workers):
        for name, process in workers.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{processes.log(name)}")
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not start")
        time.sleep(0.1)

    with api.client() as client:
        accepted = client.post("/v1/plans", json=plan_request)
    if accepted.status_code != 202:
        raise RuntimeError(f"the plan was refused: {accepted.status_code} {accepted.text}")
    job_id = int(accepted.json()["job_id"])
    submitted = time.monotonic()

    deadline = submitted + timeout
    while True:
        job = _read_job(api.database_url, job_id)
        owned = job["status"] == "running" and _worker_pid(job["lease_owner"]) in by_pid
        # Killed in the optimisation itself, not while the predictor loads.
        if owned and (job["progress"] or {}).get("phase") == "planning":
            break
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            raise RuntimeError(f"the plan was never seen running: {job}")
        time.sleep(0.02)
    planning = time.monotonic()
    victim_pid = _worker_pid(job["lease_owner"])
    assert victim_pid is not None
    victim = by_pid[victim_pid]
    time.sleep(kill_after_seconds)
    running_when_killed = _read_job(api.database_url, job_id)
    workers[victim].send_signal(signal.SIGKILL)
    workers[victim].wait(10)
    processes.running.pop(victim)
    killed = time.monotonic()

    while True:
        final = _read_job(api.database_url, job_id)
        if final["status"] in ("succeeded", "failed"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the plan did not finish within {timeout:.0f} s after the kill: {final}")
        time.sleep(0.1)
    finished = time.monotonic()
    with api.client() as client:
        plan = client.get(f"/v1/plans/{job_id}").json()
    survivor_pid = _worker_pid(final["lease_owner"])
    survivor = by_pid.get(survivor_pid) if survivor_pid is not None else None
    survivor_exit = processes.stop(survivor) if survivor is not None else None
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


# Scenario: PostgreSQL restarted under load ----------------------------------------------------------


@dataclass
class ResponseLog:
    """Statuses of every answer the clients got (an httpx response hook), and transport errors."""

    statuses: Counter[int] = field(default_factory=Counter)
    replays: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, response: httpx.Response) -> None:
        with self.lock:
            self.statuses[response.status_code] += 1
            self.replays += response.headers.get("Idempotency-Replayed") == "true"

    def successes(self) -> int:
        with self.lock:
            return sum(n for status, n in self.statuses.items() if 200 <= status < 300)


class ReadinessProbe(threading.Thread):
    """Polls /readyz every `interval` seconds and records (monotonic time, status or 0 on no answer)."""

    def __init__(self, base_url: str, interval: float = 0.05) -> None:
        super().__init__(name="readyz-probe", daemon=True)
        self.base_url = base_url
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self.stop.is_set():
                try:
                    status = client.get(f"{self.base_url}/readyz").status_code
                except httpx.TransportError:
                    status = 0
                self.samples.append((time.monotonic(), status))
                self.stop.wait(self.interval)

    def unready_spell(self, after: float) -> tuple[float | None, float | None]:
        """First non-200 sample at or after `after`, and the first 200 after that one."""
        down = next((t for t, status in self.samples if t >= after and status != 200), None)
        if down is None:
            return None, None
        up = next((t for t, status in self.samples if t > down and status == 200), None)
        return down, up


def _submit_with_sink(
    api: Api,
    device_id: int,
    key: str,
    context: RunContext,
    rows: Sequence[Measurement],
    spool: Path,
    batch_rows: int,
    pause: float,
    log: ResponseLog,
    deadline: float,
    errors: list[str],
) -> None:
    """One client: write `rows` through an HttpSink, then retry until its spool is empty."""
    client = httpx.Client(timeout=5.0, event_hooks={"response": [log.hook]})
    try:
        sink = HttpSink(
            api.base_url,
            str(device_id),
            key,
            context,
            spool,
            batch_size=batch_rows,
            backoff_seconds=0.1,
            max_backoff_seconds=1.0,
            max_retries=6,
            client=client,
        )
        for row in rows:
            sink.write(row)
            time.sleep(pause)
        sink.close()
        while list((spool / "pending").glob("*.json")):
            if time.monotonic() > deadline:
                errors.append(f"device {device_id}: batches still pending at the deadline")
                return
            time.sleep(0.2)
            HttpSink(
                api.base_url, str(device_id), key, context, spool, batch_size=batch_rows, client=client
            ).close()
        rejected = sorted(p.name for p in (spool / "rejected").iterdir())
        if rejected:
            errors.append(f"device {device_id}: batches rejected: {rejected}")
    except Exception as exc:  # reported by the caller; a thread must not die silently
        errors.append(f"device {device_id}: {type(exc).__name__}: {exc}")
    finally:
        client.close()


def expected_batch_keys(device_id: int, rows: Sequence[Measurement], batch_rows: int) -> set[str]:
    """The idempotency keys HttpSink gives `rows` written in order, `batch_rows` to a batch."""
    return {
        batch_idempotency_key(str(device_id), [m.sample_key for m in rows[i : i + batch_rows]])
        for i in range(0, len(rows), batch_rows)
    }


def postgres_restart_under_load(
    api: Api,
    cluster: PostgresCluster,
    context: RunContext,
    source: Sequence[Measurement],
    workdir: Path,
    *,
    clients: int = 3,
    batches_per_client: int = 8,
    batch_rows: int = 5,
    pause: float = 0.02,
    restart_after_share: float = 0.3,
    timeout: float = 90.0,
) -> dict[str, Any]:
    """Clients post batches while the cluster restarts; returns what was sent, stored and seen.

    The cluster is started again in any case (``finally``) if the restart left it down.
    """
    devices = [api.register_device(f"restart-{i}-{os.getpid()}", context) for i in range(clients)]
    rows_per_client = batches_per_client * batch_rows
    rows = {
        device_id: replicate_rows(source, rows_per_client, f"rs-{device_id}") for device_id, _key in devices
    }
    log = ResponseLog()
    errors: list[str] = []
    probe = ReadinessProbe(api.base_url)
    started_before = postmaster_started(api.database_url)
    deadline = time.monotonic() + timeout
    threads = [
        threading.Thread(
            target=_submit_with_sink,
            args=(api, device_id, key, context, rows[device_id], workdir / f"spool-{device_id}", batch_rows),
            kwargs={"pause": pause, "log": log, "deadline": deadline, "errors": errors},
            name=f"client-{device_id}",
        )
        for device_id, key in devices
    ]
    total_batches = clients * batches_per_client
    began = time.monotonic()
    probe.start()
    restart_started = restart_done = float("nan")
    submitted_before_restart = 0
    try:
        for thread in threads:
            thread.start()
        while log.successes() < restart_after_share * total_batches:
            if time.monotonic() > deadline or not any(t.is_alive() for t in threads):
                raise RuntimeError(f"the clients stored too little before the restart: {errors}")
            time.sleep(0.02)
        submitted_before_restart = log.successes()
        restart_started = time.monotonic()
        cluster.restart()
        restart_done = time.monotonic()
    finally:
        cluster.ensure_running()
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic()))
    wall = time.monotonic() - began
    # Ready again: the first 200 after the restart began (waits a little if none came yet).
    while time.monotonic() < deadline and not any(
        t > restart_done and status == 200 for t, status in probe.samples
    ):
        time.sleep(0.05)
    probe.stop.set()
    probe.join(5)
    down, up = probe.unready_spell(restart_started)
    ready_again = next((t for t, status in probe.samples if t > restart_done and status == 200), None)
    counts = count_stored(api.database_url, [device_id for device_id, _ in devices])
    expected = {
        device_id: expected_batch_keys(device_id, rows[device_id], batch_rows) for device_id, _ in devices
    }
    keys = {device_id: stored_keys(api.database_url, device_id) for device_id, _ in devices}
    return {
        "clients": clients,
        "batch_rows": batch_rows,
        "batches_submitted": sum(len(keys) for keys in expected.values()),
        "rows_submitted": sum(len(r) for r in rows.values()),
        "batches_stored": sum(c["batches"] for c in counts.values()),
        "rows_stored": sum(c["rows"] for c in counts.values()),
        "rows_duplicated": sum(c["rows"] - c["distinct_rows"] for c in counts.values()),
        "batches_missing": sum(len(expected[d] - keys[d][0]) for d in expected),
        "batches_unexpected": sum(len(keys[d][0] - expected[d]) for d in expected),
        "rows_missing": sum(len({m.sample_key for m in rows[d]} - keys[d][1]) for d in expected),
        "batches_stored_before_restart": submitted_before_restart,
        "responses": {str(status): n for status, n in sorted(log.statuses.items())},
        "replayed_responses": log.replays,
        "client_errors": errors,
        "postmaster_restarted": postmaster_started(api.database_url) > started_before,
        "restart_seconds": round(restart_done - restart_started, 3),
        "api_unready_seconds": round(up - down, 3) if down is not None and up is not None else 0.0,
        "api_saw_outage": down is not None,
        "seconds_restart_start_to_ready": round(ready_again - restart_started, 3) if ready_again else None,
        "seconds_restart_done_to_ready": round(ready_again - restart_done, 3) if ready_again else None,
        "wall_seconds": round(wall, 3),
    }


# Scenario: many agents at once ----------------------------------------------------------------------


def overlapping_batches(
    device_id: int, context: RunContext, rows: Sequence[Measurement], batch_rows: int, overlap: int
) -> list[ProfileBatch]:
    """Batches of `batch_rows` consecutive rows, each sharing `overlap` rows with the next one."""
    step = batch_rows - overlap
    return [
        ProfileBatch.build(f"cc-{device_id}-{start:06d}", context, list(rows[start : start + batch_rows]))
        for start in range(0, len(rows) - overlap, step)
    ]


def _post_until_final(
    client: httpx.Client, device_id: int, batch: ProfileBatch, retries: int
) -> httpx.Response | str:
    """POST one batch; transport errors, 5xx and 409 are retried with the same key.

    Returns the final response, or the last error when no attempt got one.
    """
    body = batch.model_dump_json().encode()
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(0.05 * 2**attempt)
        try:
            response = client.post(
                f"/v1/devices/{device_id}/profiles",
                content=body,
                headers={"Idempotency-Key": batch.idempotency_key},
            )
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}"
            continue
        if response.status_code not in RETRIED_STATUS:
            return response
        error = f"{response.status_code} {response.text[:300]}"
    return error


def _post_batches(
    base_url: str,
    device_id: int,
    key: str,
    batches: Sequence[ProfileBatch],
    answers: list[tuple[str, int, bool, dict[str, Any]]],
    errors: list[str],
    lock: threading.Lock,
    retries: int = 8,
) -> None:
    """Post each batch until it gets a final answer; 201 answers go to `answers`, the rest to `errors`."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=base_url, timeout=30.0, headers=headers) as client:
        for batch in batches:
            outcome = _post_until_final(client, device_id, batch, retries)
            with lock:
                if isinstance(outcome, httpx.Response) and outcome.status_code == 201:
                    replayed = outcome.headers.get("Idempotency-Replayed") == "true"
                    answers.append((batch.idempotency_key, device_id, replayed, outcome.json()))
                else:
                    described = (
                        f"{outcome.status_code} {outcome.text[:300]}"
                        if isinstance(outcome, httpx.Response)
                        else outcome
                    )
                    errors.append(f"device {device_id} batch {batch.idempotency_key}: {described}")


def concurrent_submitters(
    api: Api,
    context: RunContext,
    source: Sequence[Measurement],
    *,
    agents: int = 20,
    batches_per_agent: int = 4,
    batch_rows: int = 10,
    overlap: int = 5,
) -> dict[str, Any]:
    """`agents` devices, two threads each posting the same overlapping batches in opposite orders at once,
    then every batch replayed; returns what was sent, answered and stored."""
    devices = [api.register_device(f"agent-{i}-{os.getpid()}", context) for i in range(agents)]
    step = batch_rows - overlap
    row_count = step * batches_per_agent + overlap
    rows = {device_id: replicate_rows(source, row_count, f"cc-{device_id}") for device_id, _ in devices}
    batches = {
        device_id: overlapping_batches(device_id, context, rows[device_id], batch_rows, overlap)
        for device_id, _ in devices
    }
    answers: list[tuple[str, int, bool, dict[str, Any]]] = []
    errors: list[str] = []
    lock = threading.Lock()
    threads = []
    for device_id, key in devices:
        for order in (batches[device_id], batches[device_id][::-1]):
            threads.append(
                threading.Thread(
                    target=_post_batches, args=(api.base_url, device_id, key, order, answers, errors, lock)
                )
            )
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    first_round = list(answers)
    # Every batch once more, one after another: each must be a replay with the first answer.
    replay_answers: list[tuple[str, int, bool, dict[str, Any]]] = []
    for device_id, key in devices:
        _post_batches(api.base_url, device_id, key, batches[device_id], replay_answers, errors, lock)
    counts = count_stored(api.database_url, [device_id for device_id, _ in devices])
    fresh = Counter(batch_key for batch_key, _d, replayed, _body in first_round if not replayed)
    first_body = {batch_key: body for batch_key, _d, replayed, body in first_round if not replayed}
    rows_stored = sum(c["rows"] for c in counts.values())
    return {
        "agents": agents,
        "threads": len(threads),
        "batches_per_agent": len(next(iter(batches.values()))),
        "batch_rows": batch_rows,
        "overlap_rows": overlap,
        "posts": len(first_round) + len(replay_answers),
        "batches_submitted": sum(len(b) for b in batches.values()),
        "batches_stored": sum(c["batches"] for c in counts.values()),
        "batches_stored_fresh_more_than_once": sum(1 for n in fresh.values() if n > 1),
        "batches_never_stored_fresh": sum(
            1 for b in batches.values() for batch in b if batch.idempotency_key not in fresh
        ),
        "replays_with_another_answer": sum(
            1 for batch_key, _d, _r, body in replay_answers if body != first_body.get(batch_key)
        ),
        "replays_not_marked": sum(1 for _k, _d, replayed, _b in replay_answers if not replayed),
        "rows_submitted": sum(len(r) for r in rows.values()),
        "rows_stored": rows_stored,
        "rows_duplicated": sum(c["rows"] - c["distinct_rows"] for c in counts.values()),
        "rows_stored_by_answers": sum(
            int(body["stored"]["network"]) for _k, _d, replayed, body in first_round if not replayed
        ),
        "errors": errors,
        "wall_seconds": round(wall, 3),
        "rows_per_second": round(rows_stored / wall, 1) if wall > 0 else None,
        "posts_per_second": round(len(first_round) / wall, 1) if wall > 0 else None,
    }


def summarise_kill(outcome: dict[str, Any]) -> dict[str, Any]:
    """A worker-kill outcome without the plan's per-layer detail."""
    job = outcome["job"]
    result = job["result"] or {}
    return {
        "status": job["status"],
        "attempts": job["attempts"],
        "error": job["error"],
        "killed_worker_pid": outcome["killed_worker_pid"],
        "survivor_worker_pid": outcome["survivor_worker_pid"],
        "progress_when_killed": outcome["progress_when_killed"],
        "predicted_ms": (result.get("predicted") or {}).get("total_ms"),
        "budget_ms": result.get("budget_ms"),
        "widths": result.get("widths"),
        "lease_seconds": outcome["lease_seconds"],
        "seconds_submit_to_planning": outcome["seconds_submit_to_planning"],
        "seconds_kill_to_completion": outcome["seconds_kill_to_completion"],
    }


# The benchmark --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="worker-kill rounds")
    parser.add_argument("--clients", type=int, default=8, help="HttpSink clients during the restart")
    parser.add_argument("--batches", type=int, default=20, help="batches per restart client")
    parser.add_argument("--agents", type=int, default=20, help="concurrent agents (devices)")
    parser.add_argument("--agent-batches", type=int, default=20, help="overlapping batches per agent")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    from lpnet.arch.from_torch import network_from_torchvision
    from lpnet.predictor.artifact import load_predictor
    from tests.conftest import fresh_postgres_database
    from tests.service.support import measure_tiny_profile

    cluster = PostgresCluster.find()
    if cluster is None:
        raise SystemExit("pg_ctlcluster and a cluster under /etc/postgresql are needed")
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    print("measuring the tiny network and fitting its predictor ...", flush=True)
    profile = measure_tiny_profile()
    network = network_from_torchvision("resnet18", (1, 3, 64, 64))
    budget = 0.6 * load_predictor(profile.fitted.artifact).predict(network).total_ms
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lpnet-reliability-") as tmp, fresh_postgres_database() as url:
        workdir = Path(tmp)
        with Processes(workdir / "logs") as processes, running_api(processes, url, workdir / "data") as api:
            device_id, _ = api.register_device("kill-cpu", profile.context)
            store_device_predictor(url, device_id, profile.fitted)
            request = {
                "device": "kill-cpu",
                "architecture": {"torchvision": "resnet18", "input_shape": [1, 3, 64, 64]},
                "budget_ms": budget,
            }
            kills = []
            for round_ in range(args.kills):
                print(f"worker kill {round_ + 1}/{args.kills} ...", flush=True)
                kills.append(summarise_kill(worker_kill(api, processes, workdir / "data", request)))
            seconds = sorted(k["seconds_kill_to_completion"] for k in kills)
            results["worker_kill"] = {
                "rounds": kills,
                "succeeded": sum(k["status"] == "succeeded" for k in kills),
                "seconds_kill_to_completion_median": seconds[len(seconds) // 2],
            }
            print("PostgreSQL restart under load ...", flush=True)
            results["postgres_restart"] = postgres_restart_under_load(
                api,
                cluster,
                profile.context,
                profile.measurements,
                workdir,
                clients=args.clients,
                batches_per_client=args.batches,
                batch_rows=10,
            )
            print(f"{args.agents} concurrent agents ...", flush=True)
            results["concurrent_submitters"] = concurrent_submitters(
                api,
                profile.context,
                profile.measurements,
                agents=args.agents,
                batches_per_agent=args.agent_batches,
                batch_rows=20,
                overlap=10,
            )
    report = {
        "bench": "reliability",
        "date": started.isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_before": [round(x, 2) for x in load_before]},
        "protocol": {
            "database": "PostgreSQL (local cluster) restarted with pg_ctlcluster --mode fast",
            "server": "one `lpnet serve` process (no embedded worker) on loopback; clients are threads here",
            "workers": f"{args.kills} rounds of two fresh `lpnet worker` processes, lease 2 s, poll 0.2 s; an "
            "architecture plan of resnet18 at 64x64 (predictor fitted on the tiny network), the worker that "
            "leased it SIGKILLed 0.3 s into planning; time from the kill to the plan's completion",
            "rows": "real timings of the tiny network, copied under distinct sample keys",
            "restart": f"{args.clients} HttpSink clients x {args.batches} batches of 10 rows, 20 ms between "
            "rows; restart once 30 % of the batches were stored",
            "concurrent": f"{args.agents} agents x 2 threads posting {args.agent_batches} batches of 20 rows "
            "(10 shared with the next batch) in opposite orders, then every batch replayed once",
        },
        **results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
