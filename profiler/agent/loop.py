"""The agent's main loop: connect to the server, then lease and run tasks until stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import httpx

from profiler.agent.campaign import run_campaign
from profiler.agent.client import AgentError, ServerClient, ServerRefused, ServerUnreachable
from profiler.agent.config import DEVICE_ENV, MAX_RETRY_WAIT_S, AgentLoopConfig
from profiler.agent.heartbeat import Heartbeat, TaskLost
from profiler.agent.outbox import Outbox
from profiler.agent.state import STATE_FILE, AgentState, token_fingerprint
from profiler.agent.verify import run_verify

if TYPE_CHECKING:
    from profiler.backends.base import Backend
    from profiler.device import DeviceSpec
    from profiler.environment import AllocatorPolicy

logger = logging.getLogger(__name__)


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
        self.server = ServerClient(config.server, config.token, config.request_timeout, client)
        self.outbox = Outbox(self.state_dir / "outbox", self.server, self.agent_id)
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
        with stop_on_signals(self.stop):
            try:
                self.connect_with_retry()
                self.serve()
            except KeyboardInterrupt:
                self.outbox.flush_once()
                logger.info("agent %s stopped", self.agent_id)
            finally:
                self.server.close()
        return 0

    def serve(self) -> None:
        """Lease and run tasks; back off while the server is unreachable."""
        wait = self.config.poll_seconds
        while not self.stop.is_set():
            try:
                self.outbox.flush()
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
                run_campaign(self, task)
            elif task["kind"] == "verify":
                run_verify(self, task)
            else:
                self.finish(
                    task, "fail", {"error": f"this agent cannot run {task['kind']!r} tasks; update it"}
                )
        except TaskLost as exc:
            logger.warning("dropped task %d: %s", task["id"], exc)
        self.tasks_done += 1
        self.state.task_id = None
        self._save_state()

    def start_heartbeat(self, task: dict[str, Any]) -> Heartbeat:
        """A started thread renewing the task's lease."""
        heartbeat = Heartbeat(self.server, int(task["id"]), self.agent_id, self.lease_seconds)
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

    def allocator_policy(self) -> AllocatorPolicy:
        """The device's allocator policy, which every measurement is taken under.

        Raises:
            ValueError: A policy this agent does not know.
        """
        from profiler.environment import AllocatorPolicy

        # A server without allocator policies states none: it measures every device under retain.
        return AllocatorPolicy(self.device.get("allocator", AllocatorPolicy.RETAIN))

    def backend(self, spec: DeviceSpec) -> Backend:
        """One backend per device spec, built once."""
        if self._backend is None or self._backend[0] != spec:
            self._backend = (spec, spec.create_backend())
        return self._backend[1]

    def finish(self, task: dict[str, Any], action: str, body: dict[str, Any]) -> None:
        """Put a task's completion or failure in the outbox (on disk first), then try to deliver it."""
        self.outbox.put(int(task["id"]), action, body)
