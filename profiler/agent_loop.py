"""The device agent: say hello to an lpnet server, lease measurement tasks, run them, post the results.

Runs on the device, with only the profiler installed (HTTP through httpx, nothing of the service):

    lpnet agent --server http://server:8000 --token $AGENT_KEY
    python -m profiler.agent_loop --server http://server:8000 --token $ADMIN_KEY --device edge-1

With the device's agent key the device is the key's. With an admin key and ``--device NAME`` the
agent registers the device from this machine (or reuses it), creates an agent key for it and keeps
that key in its state directory, so a restart needs the admin key no more.

Tasks: a profile campaign (measure width variants and layers of model families; the measurements
go to ``/v1/devices/{id}/profiles`` in batches through `HttpSink`, with idempotency keys and a disk
spool), or a verify (measure one whole network for a plan). Everything that must reach the server
is on disk first: campaign rows in the sink's journal and spool, task results in an outbox; while
the server is unreachable they wait there and the agent retries.

Resuming: the state directory keeps the agent id and the current task. After a restart the server
hands the agent its own unexpired task again, the sink's journal and the sample keys the server
already holds are skipped, so nothing is measured or stored twice. SIGTERM and SIGINT stop the agent
cleanly: the measurement in flight is dropped, the spool gets one delivery attempt, the lease is
kept for a restart (or lapses, and another agent takes the task over).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import httpx

from profiler.errors import ProfilerError

if TYPE_CHECKING:
    from profiler.backends.base import Backend
    from profiler.batch import Measurement, RunContext
    from profiler.device import DeviceSpec
    from profiler.sinks import HttpSink, MeasurementSink

logger = logging.getLogger(__name__)

SERVER_ENV = "LPNET_SERVER"
API_KEY_ENV = "LPNET_API_KEY"
DEVICE_ENV = "LPNET_AGENT_DEVICE"
STATE_DIR_ENV = "LPNET_AGENT_STATE_DIR"
DEFAULT_STATE_DIR = Path(".lpnet-agent")
STATE_FILE = "agent.json"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# Waiting for an unreachable server backs off up to this many seconds between attempts.
MAX_RETRY_WAIT_S = 30.0
# A campaign logs its progress at most this often.
LOG_INTERVAL_S = 20.0


class AgentError(ProfilerError):
    """The agent cannot go on: bad configuration, or the server refuses it."""

    code = "agent_error"


class ServerUnreachable(AgentError):
    """No answer, or an answer that says to try again later (5xx, 429)."""

    code = "server_unreachable"


class ServerRefused(AgentError):
    """A 4xx answer in the service's error shape."""

    code = "server_refused"

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {error_code})", {"status": status, "code": error_code})
        self.status = status
        self.error_code = error_code
        self.reason = message

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServerRefused:
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["code"]), str(error["message"]))
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, "http_error", response.text[:300] or response.reason_phrase)


class TaskLost(Exception):
    """The server took the task away (lapsed lease, cancelled): stop working on it."""


@dataclass
class AgentLoopConfig:
    """What `lpnet agent` was told."""

    server: str
    token: str
    device: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    poll_seconds: float = 5.0
    once: bool = False
    backend: str = "torch-cpu"
    threads: int = 1
    profile_minutes: float | None = None
    lease_seconds: float | None = None
    batch_rows: int = 10
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        self.server = self.server.rstrip("/")
        if not re.match(r"^https?://[^/\s]+", self.server):
            raise AgentError(f"--server must be an http(s) URL such as http://host:8000, got {self.server!r}")
        if not self.token.strip():
            raise AgentError(f"an API key is needed: --token KEY or ${API_KEY_ENV}")
        if not self.poll_seconds > 0:
            raise AgentError(f"--poll-seconds must be positive, got {self.poll_seconds}")
        if self.profile_minutes is not None and not self.profile_minutes > 0:
            raise AgentError(f"--profile-minutes must be positive, got {self.profile_minutes}")
        if self.lease_seconds is not None and not 1 <= self.lease_seconds <= 3600:
            raise AgentError(f"--lease-seconds must be in 1..3600, got {self.lease_seconds}")
        if not 1 <= self.batch_rows <= 500:
            raise AgentError(f"--batch-rows must be in 1..500, got {self.batch_rows}")
        self.state_dir = Path(self.state_dir)


@dataclass
class AgentState:
    """What survives a restart: the agent's id, the key it obtained, its device and current task."""

    agent_id: str
    server: str | None = None
    device_id: int | None = None
    device_name: str | None = None
    agent_key: str | None = None
    # Fingerprint of the token the agent key was obtained with: a different token means other intentions.
    key_origin: str | None = None
    task_id: int | None = None

    @classmethod
    def load(cls, path: Path) -> AgentState:
        """The state stored at `path`, or a fresh one with a new agent id."""
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
                return cls(**known)
            except (OSError, ValueError, TypeError) as exc:
                raise AgentError(
                    f"the agent state {path} is unreadable ({exc}); fix or remove it (the agent then gets a new id)"
                ) from exc
        return cls(agent_id=new_agent_id())

    def save(self, path: Path) -> None:
        """Write atomically, readable by this user only (it may hold an API key)."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def token_fingerprint(token: str) -> str:
    """A short hash of an API key, to recognise it without storing it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def new_agent_id() -> str:
    """This host's name and a random suffix, in the characters the server accepts."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60] or "agent"
    return f"{host}:{uuid.uuid4().hex[:12]}"


class ServerClient:
    """JSON calls to the server; raises `ServerUnreachable` or `ServerRefused` instead of returning errors."""

    def __init__(self, base_url: str, token: str, timeout: float, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=timeout)

    def call(
        self, method: str, path: str, *, json_body: Any = None, params: Mapping[str, str] | None = None
    ) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self._client.request(
                method, url, json=json_body, params=params, headers={"Authorization": f"Bearer {self.token}"}
            )
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{self.base_url} is unreachable ({type(exc).__name__}: {exc})") from exc
        if response.status_code in RETRYABLE_STATUS:
            raise ServerUnreachable(
                f"{method} {path} answered {response.status_code}; the server is not ready"
            )
        if not response.is_success:
            raise ServerRefused.from_response(response)
        return response

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


class _Heartbeat(threading.Thread):
    """Renews a task's lease every `interval` seconds with the latest progress, until stopped.

    A 404 or 409 answer means the task is no longer this agent's: `lost` is set and the work stops at
    its next check. An unreachable server is logged and tried again at the next beat.
    """

    def __init__(self, server: ServerClient, task_id: int, agent_id: str, lease_seconds: float) -> None:
        super().__init__(name=f"heartbeat-{task_id}", daemon=True)
        self.server = server
        self.task_id = task_id
        self.agent_id = agent_id
        self.lease_seconds = lease_seconds
        self.interval = max(0.5, lease_seconds / 3)
        self.progress: dict[str, Any] = {}
        self.lost = threading.Event()
        self.reason = ""
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        body = {
            "agent_id": self.agent_id,
            "lease_seconds": self.lease_seconds,
            "progress": dict(self.progress),
        }
        try:
            self.server.call("POST", f"/v1/agent/tasks/{self.task_id}/heartbeat", json_body=body)
        except ServerRefused as exc:
            if exc.status in (404, 409):
                self.reason = exc.reason
                self.lost.set()
                self._stopped.set()
                logger.warning("task %d is no longer ours: %s", self.task_id, exc.reason)
            else:
                logger.warning("heartbeat of task %d refused: %s", self.task_id, exc)
        except ServerUnreachable as exc:
            logger.warning("heartbeat of task %d failed (%s); measuring on", self.task_id, exc)

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=self.server.timeout)


class _KnownKeysSink:
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
class _CampaignProgress:
    """Counts a campaign's measurements into the heartbeat's progress; stops the run if the task is lost."""

    task_id: int
    heartbeat: _Heartbeat
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


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread once; later ones are only logged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            logger.warning("%s again: already stopping", name)
            return
        stop.set()
        logger.warning("%s received: stopping (the spool is kept and flushed once)", name)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _safe_name(text: str) -> str:
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:60] + "-" + digest


class AgentLoop:
    """Connects to the server, then leases and runs tasks until stopped (or, with `once`, until idle)."""

    def __init__(self, config: AgentLoopConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._state_path = self.state_dir / STATE_FILE
        self.state = AgentState.load(self._state_path)
        if not self._state_path.exists():
            self.state.save(self._state_path)  # the agent's id is fixed from its first start on
        self.outbox = self.state_dir / "outbox"
        (self.outbox / "rejected").mkdir(parents=True, exist_ok=True)
        self.server = ServerClient(config.server, config.token, config.request_timeout, client)
        self.device: dict[str, Any] = {}
        self.lease_seconds = config.lease_seconds or 60.0
        self.stop = threading.Event()
        self.tasks_done = 0
        self._backend: tuple[DeviceSpec, Backend] | None = None

    @property
    def agent_id(self) -> str:
        return self.state.agent_id

    # Running ----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT, or until nothing is left with `once`; returns the exit code."""
        from profiler.environment import retain_freed_memory

        # The profiler's allocator policy: latencies that do not depend on what ran before.
        retain_freed_memory()
        with stop_on_signals(self.stop):
            try:
                self.connect_with_retry()
                self.serve()
            except KeyboardInterrupt:
                self._flush_outbox_once()
                logger.info("agent %s stopped", self.agent_id)
            finally:
                self.server.close()
        return 0

    def serve(self) -> None:
        """Lease and run tasks; back off while the server is unreachable."""
        wait = self.config.poll_seconds
        while not self.stop.is_set():
            try:
                self.flush_outbox()
                task = self.lease()
            except ServerUnreachable as exc:
                if self.config.once:
                    raise
                logger.warning("%s; retrying in %.1f s", exc, wait)
                time.sleep(wait)
                wait = min(MAX_RETRY_WAIT_S, wait * 2)
                continue
            wait = self.config.poll_seconds
            if task is None:
                if self.config.once:
                    logger.info("nothing left to do (%d task(s) run)", self.tasks_done)
                    return
                time.sleep(self.config.poll_seconds)
                continue
            self.run_task(task)

    # Connecting -------------------------------------------------------------------------------------

    def connect_with_retry(self) -> None:
        """`connect`, waiting out an unreachable server (unless `once`)."""
        wait = self.config.poll_seconds
        while True:
            try:
                self.connect()
                return
            except ServerUnreachable as exc:
                if self.config.once:
                    raise
                logger.warning("%s; retrying in %.1f s", exc, wait)
                time.sleep(wait)
                wait = min(MAX_RETRY_WAIT_S, wait * 2)

    def connect(self) -> None:
        """Say hello; with an admin key, register the device if needed and switch to an agent key for it.

        An agent key kept in the state directory, obtained by an earlier start with the same token
        (an admin key), is used first, so a revoked admin key does not stop a restart; if the server
        no longer knows the kept key, the given token takes over.
        """
        if self.state.server != self.config.server:
            # Another server: a key and device in the state belong to the old one.
            self.state = AgentState(agent_id=self.state.agent_id)
            self._save_state()
        same_origin = self.state.key_origin == token_fingerprint(self.config.token)
        stored = self.state.agent_key if same_origin and self._state_matches_device() else None
        if stored:
            self.server.token = stored
            try:
                self._adopt(self.hello())
                return
            except ServerRefused as exc:
                if exc.status != 401:
                    raise self._refusal(exc) from exc
                logger.warning("the stored agent key was refused (%s); using the given token", exc.reason)
                self.state.agent_key = None
                self._save_state()
        self.server.token = self.config.token
        self._adopt(self._hello_or_register())

    def _hello_or_register(self) -> dict[str, Any]:
        try:
            hello = self.hello()
        except ServerRefused as exc:
            if not (exc.status == 404 and self.config.device):
                raise self._refusal(exc) from exc
            self._register_device()
            try:
                hello = self.hello()
            except ServerRefused as again:
                raise self._refusal(again) from again
        if hello["key_scope"] != "agent":
            hello = self._switch_to_agent_key(hello)
        return hello

    def _refusal(self, exc: ServerRefused) -> AgentError:
        if exc.status == 422 and not self.config.device and "admin key" in exc.reason:
            return AgentError(f"with an admin key, name the device: --device NAME (or ${DEVICE_ENV})")
        if exc.status == 404 and self.config.device:
            return self._register_refused(exc)
        return AgentError(f"the server refused the agent: {exc}")

    def _register_refused(self, exc: ServerRefused) -> AgentError:
        return AgentError(
            f"device {self.config.device!r} is not registered on {self.config.server} and this key cannot "
            f"register it ({exc.reason}); give an admin key or the device's agent key"
        )

    def hello(self) -> dict[str, Any]:
        from profiler.environment import collect_environment

        body: dict[str, Any] = {
            "agent_id": self.agent_id,
            "environment": collect_environment({"threads": self.config.threads}).model_dump(mode="json"),
            "profile_minutes": self.config.profile_minutes,
        }
        if self.config.device:
            body["device"] = self.config.device
        answer: dict[str, Any] = self.server.call("POST", "/v1/agent/hello", json_body=body).json()
        return answer

    def _register_device(self) -> None:
        """Register the device from this machine; the answer carries its agent key."""
        from profiler.device import local_device_spec
        from profiler.environment import collect_environment

        name = self.config.device
        spec = local_device_spec(self.config.backend, self.config.threads)
        body = {
            "name": name,
            **spec.to_dict(),
            "environment": collect_environment({"threads": spec.threads}).model_dump(mode="json"),
            "is_local": False,
        }
        try:
            created = self.server.call("POST", "/v1/devices", json_body=body).json()
        except ServerRefused as exc:
            if exc.status == 409:  # registered meanwhile by someone else: reuse it
                return
            if exc.status == 403:
                raise self._register_refused(exc) from exc
            raise AgentError(f"registering device {name!r} failed: {exc}") from exc
        logger.info("registered device %s (id %s) from this machine (%s)", name, created["id"], spec.hardware)
        self._store_key(str(created["agent_key"]), created)

    def _switch_to_agent_key(self, hello: dict[str, Any]) -> dict[str, Any]:
        """With an admin key: create an agent key for the device, keep it, and say hello again with it."""
        device = hello["device"]
        body = {"scope": "agent", "device": device["id"], "name": f"lpnet agent {self.agent_id}"[:128]}
        try:
            created = self.server.call("POST", "/v1/keys", json_body=body).json()
        except ServerRefused as exc:
            raise AgentError(f"creating an agent key for device {device['name']!r} failed: {exc}") from exc
        self._store_key(str(created["key"]), device)
        logger.info(
            "created agent key %s for device %s; kept in %s",
            created["prefix"],
            device["name"],
            self.state_dir,
        )
        return self.hello()

    def _store_key(self, key: str, device: Mapping[str, Any]) -> None:
        self.state.agent_key = key
        self.state.key_origin = token_fingerprint(self.config.token)
        self.state.device_id = int(device["id"])
        self.state.device_name = str(device["name"])
        self._save_state()
        self.server.token = key

    def _state_matches_device(self) -> bool:
        wanted = self.config.device
        return wanted is None or wanted in (self.state.device_name, str(self.state.device_id))

    def _adopt(self, hello: dict[str, Any]) -> None:
        self.device = dict(hello["device"])
        if self.config.lease_seconds is None:
            self.lease_seconds = float(hello["lease_seconds"])
        self.state.device_id = int(self.device["id"])
        self.state.device_name = str(self.device["name"])
        self._save_state()
        if self.device["backend"] != self.config.backend or self.device["threads"] != self.config.threads:
            logger.warning(
                "device %s is registered with backend %s and %d thread(s); measuring with those, not --backend %s "
                "--threads %d",
                self.device["name"],
                self.device["backend"],
                self.device["threads"],
                self.config.backend,
                self.config.threads,
            )
        campaign = hello.get("campaign")
        logger.info(
            "agent %s serving device %s (id %d) on %s%s",
            self.agent_id,
            self.device["name"],
            self.device["id"],
            self.config.server,
            f"; campaign {campaign['id']} {'queued' if hello.get('campaign_queued') else 'open'}"
            if campaign
            else "",
        )

    def _save_state(self) -> None:
        self.state.server = self.config.server
        self.state.save(self._state_path)

    # Tasks ------------------------------------------------------------------------------------------

    def lease(self) -> dict[str, Any] | None:
        """The next task of the device (or this agent's own unfinished one), None when there is none."""
        body: dict[str, Any] = {"agent_id": self.agent_id}
        if self.config.lease_seconds is not None:
            body["lease_seconds"] = self.config.lease_seconds
        try:
            response = self.server.call("POST", "/v1/agent/tasks/lease", json_body=body)
        except ServerRefused as exc:
            raise AgentError(f"the server refused to lease a task: {exc}") from exc
        if response.status_code == 204:
            return None
        task: dict[str, Any] = response.json()
        if self.state.task_id is not None and self.state.task_id != task["id"]:
            logger.info("task %d of the previous run is no longer ours", self.state.task_id)
        self.state.task_id = int(task["id"])
        self._save_state()
        logger.info(
            "%s task %d (%s), attempt %d of %d",
            "resuming" if task.get("resumed") else "leased",
            task["id"],
            task["kind"],
            task["attempts"],
            task["max_attempts"],
        )
        return task

    def run_task(self, task: dict[str, Any]) -> None:
        """Run one leased task; its result (or failure) goes through the outbox."""
        try:
            if task["kind"] == "profile_campaign":
                self.run_campaign(task)
            elif task["kind"] == "verify":
                self.run_verify(task)
            else:
                self.finish(
                    task, "fail", {"error": f"this agent cannot run {task['kind']!r} tasks; update it"}
                )
        except TaskLost as exc:
            logger.warning("dropped task %d: %s", task["id"], exc)
        self.tasks_done += 1
        self.state.task_id = None
        self._save_state()

    def _start_heartbeat(self, task: dict[str, Any]) -> _Heartbeat:
        heartbeat = _Heartbeat(self.server, int(task["id"]), self.agent_id, self.lease_seconds)
        heartbeat.start()
        return heartbeat

    def device_spec(self) -> DeviceSpec:
        """The device as registered: what every measurement is taken (and keyed) with."""
        from profiler.device import DeviceSpec

        return DeviceSpec(
            hardware=str(self.device["hardware"]),
            backend=str(self.device["backend"]),
            threads=int(self.device["threads"]),
            batch_size=int(self.device["batch_size"]),
            dtype=str(self.device["dtype"]),
        )

    def backend(self, spec: DeviceSpec) -> Backend:
        """One backend per device spec, built once."""
        if self._backend is None or self._backend[0] != spec:
            self._backend = (spec, spec.create_backend())
        return self._backend[1]

    def run_campaign(self, task: dict[str, Any]) -> None:
        """Measure the campaign's samples into the server; complete it once every batch is delivered."""
        from lpnet.errors import LpnetError
        from profiler.agent import AgentOptions, build_sampler
        from profiler.batch import MeasurementKind
        from profiler.runner import make_run_context, run_profile

        payload = task["payload"]
        previous = task.get("progress") or {}
        elapsed_before = float(previous.get("elapsed_seconds", 0.0))
        budget = payload.get("budget_minutes")
        remaining = None if budget is None else float(budget) - elapsed_before / 60.0
        try:
            spec = self.device_spec()
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
                progress=False,
            )
            backend = self.backend(spec)
            protocol = options.protocol()
            sampler = build_sampler(options, spec)
        except (LpnetError, KeyError, ValueError) as exc:
            self.finish(task, "fail", {"error": f"cannot run this campaign here: {exc}"})
            return
        context = make_run_context(spec, protocol, backend)
        sink = self._campaign_sink(context)
        known = self._server_sample_keys()
        heartbeat = self._start_heartbeat(task)
        tracker = _CampaignProgress(
            task_id=int(task["id"]),
            heartbeat=heartbeat,
            planned=sampler.planned_total() if budget is None else None,
            budget_seconds=None if budget is None else float(budget) * 60.0,
            elapsed_before=elapsed_before,
            measured_before=int(previous.get("measured", 0)),
            failed_before=int(previous.get("failed", 0)),
        )
        heartbeat.progress = tracker.snapshot()

        def on_measurement(measurement: Measurement) -> None:
            tracker(measurement)
            # The signal handler's KeyboardInterrupt is lost when it lands in a finalizer or a
            # garbage-collector callback; the stop flag it set is not.
            if self.stop.is_set():
                raise KeyboardInterrupt

        logger.info(
            "campaign %d: families %s, %s; %d sample key(s) already on the server",
            task["id"],
            ",".join(options.families),
            f"{remaining:.1f} of {budget:g} min left"
            if remaining is not None
            else "until the counts are done",
            len(known),
        )
        summary = None
        try:
            if remaining is None or remaining > 0:
                summary = run_profile(
                    spec,
                    sampler,
                    _KnownKeysSink(sink, known),
                    protocol,
                    budget_minutes=options.budget_minutes,
                    progress=False,
                    backend=backend,
                    on_measurement=on_measurement,
                )
        finally:
            heartbeat.stop()
            if self.stop.is_set() or (summary is not None and summary.interrupted):
                sink.offline = True  # stopping: one delivery attempt per batch, the rest waits on disk
            sink.close()
        if summary is not None and summary.interrupted:
            raise KeyboardInterrupt
        self._deliver_spool(context, sink)
        progress = tracker.snapshot()
        result = {
            "measured": progress["measured"],
            "failed": progress["failed"],
            "skipped": summary.skipped if summary is not None else 0,
            "seconds": progress["elapsed_seconds"],
            "rejected_batches": sink.rejected_batches,
        }
        logger.info(
            "campaign %d done: %d measured in all, %d failed",
            task["id"],
            result["measured"],
            result["failed"],
        )
        self.finish(task, "complete", {"result": result})

    def _spool_dir(self) -> Path:
        return self.state_dir / "spool" / f"{_safe_name(self.config.server)}-device-{self.device['id']}"

    def _campaign_sink(self, context: RunContext, flush_on_start: bool = True) -> HttpSink:
        from profiler.sinks import HttpSink

        return HttpSink(
            self.config.server,
            str(self.device["id"]),
            self.server.token,
            context,
            self._spool_dir(),
            batch_size=self.config.batch_rows,
            timeout=self.config.request_timeout,
            # The agent itself retries spooled batches; the sink need not wait long for each.
            max_retries=2,
            max_backoff_seconds=5.0,
            flush_on_start=flush_on_start,
        )

    def _pending_batches(self) -> int:
        return len(list((self._spool_dir() / "pending").glob("*.json")))

    def _deliver_spool(self, context: RunContext, sink: HttpSink) -> None:
        """Wait until every spooled batch reached the server (a campaign completes only then)."""
        wait = self.config.poll_seconds
        while self._pending_batches():
            logger.warning(
                "%d batch(es) wait in %s for the server; retrying in %.1f s",
                self._pending_batches(),
                self._spool_dir(),
                wait,
            )
            time.sleep(wait)
            wait = min(MAX_RETRY_WAIT_S, wait * 2)
            retry = self._campaign_sink(context)  # delivers the pending batches as it opens
            retry.close()
            sink.rejected_batches += retry.rejected_batches

    def _server_sample_keys(self) -> set[str]:
        try:
            answer = self.server.call("GET", "/v1/agent/sample-keys").json()
        except ServerUnreachable as exc:
            logger.warning(
                "could not ask which samples the server has (%s); relying on the local journal", exc
            )
            return set()
        return set(answer["sample_keys"])

    def run_verify(self, task: dict[str, Any]) -> None:
        """Measure one whole network for a plan and send its median latency.

        On a CPU backend every sample is timed between two speed-probe runs, as profiles are, so the
        server can judge the result at the speed its predictor was fitted at.
        """
        from pydantic import ValidationError

        from lpnet.arch.ir import Network
        from lpnet.errors import LpnetError
        from profiler.protocol import TimingProtocol
        from profiler.speed import PROBE_VERSION, SpeedProbe
        from profiler.tasks import measure_network

        payload = task["payload"]
        try:
            network = Network.model_validate(payload["architecture"])
            protocol = TimingProtocol.model_validate(payload["protocol"])
            spec = self.device_spec()
            backend = self.backend(spec)
        except (ValidationError, LpnetError, KeyError) as exc:
            self.finish(task, "fail", {"error": f"cannot verify here: {exc}"})
            return
        heartbeat = self._start_heartbeat(task)
        heartbeat.progress = {"phase": "measuring", "network_hash": network.content_hash}
        started = time.perf_counter()
        probe = SpeedProbe().run if backend.runs_on_cpu else None
        try:
            timing = measure_network(network, backend, protocol, spec.batch_size, probe=probe)
        except Exception as exc:  # any failure to run the network is the task's failure, not the agent's
            self.finish(task, "fail", {"error": f"measuring the network failed: {type(exc).__name__}: {exc}"})
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
        self.finish(task, "complete", {"result": result})

    # The outbox -------------------------------------------------------------------------------------

    def finish(self, task: dict[str, Any], action: str, body: dict[str, Any]) -> None:
        """Put a task's completion or failure in the outbox (on disk first), then try to deliver it."""
        if "error" in body:
            body = {**body, "error": str(body["error"])[:4000]}
        entry = {
            "path": f"/v1/agent/tasks/{task['id']}/{action}",
            "body": {"agent_id": self.agent_id, **body},
        }
        path = self.outbox / f"task-{int(task['id']):010d}-{action}.json"
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(entry, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        try:
            self.flush_outbox()
        except ServerUnreachable as exc:
            logger.warning("task %d %s waits in the outbox: %s", task["id"], action, exc)

    def flush_outbox(self) -> int:
        """Deliver what the outbox holds, oldest first; returns how many were delivered.

        Raises:
            ServerUnreachable: The server did not answer; the rest stays for the next attempt.
            AgentError: The key was refused (401/403).
        """
        delivered = 0
        for path in sorted(self.outbox.glob("task-*.json")):
            entry = json.loads(path.read_text(encoding="utf-8"))
            try:
                self.server.call("POST", entry["path"], json_body=entry["body"])
            except ServerRefused as exc:
                if exc.status in (401, 403):
                    raise AgentError(f"the server refused the agent's key: {exc}") from exc
                # 404/409/422 will not change on a retry: keep it aside for people to look at.
                logger.warning("%s refused (%s); moved to %s", entry["path"], exc, self.outbox / "rejected")
                os.replace(path, self.outbox / "rejected" / path.name)
                continue
            path.unlink()
            delivered += 1
            logger.info("delivered %s", entry["path"])
        return delivered

    def _flush_outbox_once(self) -> None:
        try:
            self.flush_outbox()
        except AgentError as exc:
            logger.warning("the outbox keeps what it holds for the next start: %s", exc)


# Command line ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's flags, for `python -m profiler.agent_loop` and `lpnet agent` alike."""
    parser.add_argument("--server", help=f"the lpnet server's base URL (default: ${SERVER_ENV})")
    parser.add_argument(
        "--token", help=f"the device's agent key, or an admin key with --device (default: ${API_KEY_ENV})"
    )
    parser.add_argument(
        "--device", help=f"device name; with an admin key it is registered if new (default: ${DEVICE_ENV})"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help=f"agent id, keys, spool and outbox (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=5.0, help="wait between polls when idle (default: 5)"
    )
    parser.add_argument("--once", action="store_true", help="run the queued tasks, then exit")
    parser.add_argument(
        "--backend", default="torch-cpu", help="backend of a device registered here (default: torch-cpu)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="threads of a device registered here (default: 1)"
    )
    parser.add_argument(
        "--profile-minutes",
        type=float,
        help="on start, queue a campaign of this many minutes (and a fit) if the device has no predictor yet",
    )
    parser.add_argument("--lease-seconds", type=float, help="task lease to ask for (default: the server's)")
    parser.add_argument(
        "--batch-rows", type=int, default=10, help="measurements per posted batch (default: 10)"
    )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentLoopConfig:
    """The configuration from parsed flags, falling back to the LPNET_* environment variables."""
    env = os.environ if environ is None else environ
    server = args.server or env.get(SERVER_ENV)
    token = args.token or env.get(API_KEY_ENV)
    if not server:
        raise AgentError(f"give the server: --server URL or ${SERVER_ENV}")
    if not token:
        raise AgentError(f"give an API key: --token KEY or ${API_KEY_ENV}")
    state_dir = args.state_dir or env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return AgentLoopConfig(
        server=server,
        token=token,
        device=args.device or env.get(DEVICE_ENV) or None,
        state_dir=Path(state_dir),
        poll_seconds=args.poll_seconds,
        once=args.once,
        backend=args.backend,
        threads=args.threads,
        profile_minutes=args.profile_minutes,
        lease_seconds=args.lease_seconds,
        batch_rows=args.batch_rows,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m profiler.agent_loop", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    try:
        return AgentLoop(config_from_args(args)).run()
    except ProfilerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
