"""Real `lpnet agent` processes against a real server on loopback: a campaign end to end, SIGKILL in the
middle of one and a restart, a lost agent whose task another agent finishes. No measurement is stored
twice, none is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from profiler.agent.options import AgentOptions, build_sampler
from profiler.batch import MeasurementKind
from profiler.device import DeviceSpec
from service.auth import create_api_key
from service.config import AgentSettings, Settings, WorkerSettings
from service.db.migrate import upgrade
from service.db.models import (
    AgentTask,
    Device,
    KeyScope,
    LayerMeasurement,
    MeasurementContext,
    NetworkMeasurement,
    ProfileBatch,
    TaskStatus,
)
from service.db.session import make_engine, make_session_factory
from service.main import create_app
from service.testing.tiny import TINY_SPEC
from tests.service.conftest import serve_in_thread

pytestmark = pytest.mark.slow

T = TypeVar("T")
SMALL_CAMPAIGN: dict[str, Any] = {
    "families": ["resnet18"],
    "image_size": 32,
    "kinds": ["network", "isolated"],
    "network_samples": 2,
    "isolated_samples": 2,
    "quick": True,
}
EXIT_TIMEOUT_S = 120.0


@dataclass
class LiveServer:
    """A served app on a migrated database with an admin key and a remote device with its agent key."""

    url: str
    factory: sessionmaker[Session]
    admin: str
    agent_key: str
    device_id: int
    device_name: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin}"}

    def post(self, path: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers(key), timeout=30)

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=self.headers(key), timeout=30)

    def queue_campaign(self, **changes: Any) -> int:
        response = self.post(f"/v1/devices/{self.device_name}/campaigns", {**SMALL_CAMPAIGN, **changes})
        assert response.status_code == 202, response.text
        return int(response.json()["id"])

    def task(self, task_id: int) -> AgentTask:
        with self.factory() as session:
            task = session.get(AgentTask, task_id)
            assert task is not None
            return task


@contextmanager
def live_agent_server(db_url: str, *, embedded_worker: bool = False, **agent: Any) -> Iterator[LiveServer]:
    """Serve the app on `db_url` (migrated here) with a remote device `edge-cpu` measured like TINY_SPEC."""
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as session:
        admin = create_api_key(session, scope=KeyScope.ADMIN.value)[1]
        device = Device(
            name="edge-cpu",
            hardware=TINY_SPEC.hardware,
            backend=TINY_SPEC.backend,
            threads=TINY_SPEC.threads,
            batch_size=TINY_SPEC.batch_size,
            dtype=TINY_SPEC.dtype,
            environment={},
            is_local=False,
        )
        session.add(device)
        session.flush()
        agent_key = create_api_key(session, scope=KeyScope.AGENT.value, device=device)[1]
        session.commit()
        device_id = device.id
    settings = Settings(
        database_url=db_url,
        worker=WorkerSettings(embedded=embedded_worker, poll_seconds=0.2),
        agent=AgentSettings(**agent),
    )
    try:
        with serve_in_thread(create_app(settings)) as url:
            yield LiveServer(url, factory, admin, agent_key, device_id, "edge-cpu")
    finally:
        engine.dispose()


@dataclass
class AgentProcess:
    """An `lpnet agent` process and where it logs."""

    process: subprocess.Popen[bytes]
    log: Path
    state_dir: Path

    @property
    def agent_id(self) -> str:
        return str(json.loads((self.state_dir / "agent.json").read_text())["agent_id"])

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(
                f"the agent did not exit within {timeout} s:\n{self.output()[-3000:]}"
            ) from None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)


def start_agent(
    url: str, token: str, state_dir: Path, *extra: str, log_name: str | None = None
) -> AgentProcess:
    """Start `lpnet agent` (as ``python -m service agent``) polling every 0.2 s."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir.parent / (log_name or f"{state_dir.name}-{time.monotonic_ns()}.log")
    command = [
        sys.executable,
        "-m",
        "service",
        "agent",
        "--server",
        url,
        "--token",
        token,
        "--state-dir",
        str(state_dir),
        "--poll-seconds",
        "0.2",
        *extra,
    ]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=state_dir.parent, env=dict(os.environ)
        )
    return AgentProcess(process, log, state_dir)


@contextmanager
def running(agent: AgentProcess) -> Iterator[AgentProcess]:
    """Kill the agent when the block ends, whatever happened."""
    try:
        yield agent
    finally:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(10)


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, agent: AgentProcess | None = None
) -> T:
    """Poll `check` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if agent is not None and agent.process.poll() is not None:
            raise AssertionError(
                f"the agent exited ({agent.process.returncode}) before {what}:\n{agent.output()[-3000:]}"
            )
        time.sleep(0.1)
    log = f":\n{agent.output()[-3000:]}" if agent is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{log}")


def planned_keys(campaign: dict[str, Any]) -> set[str]:
    """Every sample key the campaign's counts plan for the device (how the agent samples)."""
    options = AgentOptions(
        families=campaign["families"],
        kinds=[MeasurementKind(kind) for kind in campaign["kinds"]],
        hardware=TINY_SPEC.hardware,
        image_size=campaign["image_size"],
        network_samples=campaign.get("network_samples"),
        in_context_samples=campaign.get("in_context_samples"),
        isolated_samples=campaign.get("isolated_samples"),
    )
    spec = DeviceSpec(
        TINY_SPEC.hardware, TINY_SPEC.backend, TINY_SPEC.threads, TINY_SPEC.batch_size, TINY_SPEC.dtype
    )
    sampler = build_sampler(options, spec)
    keys: set[str] = set()
    while batch := sampler.next_batch(keys, size=50):
        keys.update(sample.sample_key for sample in batch)
    return keys


@dataclass(frozen=True)
class Stored:
    """What the device has in the database."""

    rows: int
    keys: set[str]
    skipped_in_batches: int


def stored(server: LiveServer) -> Stored:
    with server.factory() as session:
        network = list(
            session.scalars(
                select(NetworkMeasurement.sample_key).where(NetworkMeasurement.device_id == server.device_id)
            )
        )
        layers = list(
            session.scalars(
                select(LayerMeasurement.sample_key).where(
                    LayerMeasurement.device_id == server.device_id,
                    LayerMeasurement.context == MeasurementContext.ISOLATED,
                )
            )
        )
        responses = session.scalars(
            select(ProfileBatch.response).where(ProfileBatch.device_id == server.device_id)
        )
        skipped = sum(r["skipped"]["network"] + r["skipped"]["layer"] for r in responses)
    return Stored(len(network) + len(layers), set(network) | set(layers), skipped)


def stored_count(server: LiveServer) -> int:
    with server.factory() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(NetworkMeasurement)
                .where(NetworkMeasurement.device_id == server.device_id)
            )
            or 0
        ) + int(
            session.scalar(
                select(func.count())
                .select_from(LayerMeasurement)
                .where(LayerMeasurement.device_id == server.device_id)
            )
            or 0
        )


def assert_exactly_planned(server: LiveServer, campaign: dict[str, Any]) -> None:
    """Every planned sample stored once: rows = distinct keys = the plan, and no batch re-sent a stored one."""
    have = stored(server)
    planned = planned_keys(campaign)
    assert have.rows == len(have.keys), "a sample key is stored twice"
    assert have.keys == planned
    assert have.skipped_in_batches == 0, "a measurement the server had was measured and sent again"


def test_a_queued_campaign_is_measured_stored_and_succeeds(sqlite_url: str, tmp_path: Path) -> None:
    with live_agent_server(sqlite_url) as server:
        task_id = server.queue_campaign()
        with running(start_agent(server.url, server.agent_key, tmp_path / "agent", "--once")) as agent:
            assert agent.wait() == 0, agent.output()[-3000:]
        task = server.task(task_id)
        assert task.status == TaskStatus.SUCCEEDED, (task.error, agent.output()[-3000:])
        assert task.lease_owner == agent.agent_id and task.attempts == 1
        assert task.result is not None and task.result["measured"] == 4 and task.result["failed"] == 0
        assert_exactly_planned(server, SMALL_CAMPAIGN)
        device = server.get(f"/v1/devices/{server.device_name}").json()
        assert device["environment"]["hostname"] and device["profiling"]["network"]["ok"] == 2
        assert device["status"]["phase"] == "profiled"
        assert f"task {task_id}" in agent.output() and "delivered /v1/agent/tasks" in agent.output()


def journaled(state_dir: Path) -> int:
    """Measurements in the agent's journal: measured, not yet sealed into a batch."""
    return sum(
        line.startswith('{"measurement"')
        for journal in state_dir.glob("spool/*/journal.jsonl")
        for line in journal.read_text(errors="replace").splitlines()
    )


def test_sigkill_mid_campaign_then_a_restart_stores_each_sample_once(sqlite_url: str, tmp_path: Path) -> None:
    campaign = {**SMALL_CAMPAIGN, "network_samples": 5, "isolated_samples": 3}
    state = tmp_path / "agent"
    with live_agent_server(sqlite_url) as server:
        task_id = server.queue_campaign(**campaign)
        # Killed with a batch on the server and a measurement only in its journal: no chance to flush.
        with running(start_agent(server.url, server.agent_key, state, "--batch-rows", "3")) as first:
            wait_until(
                lambda: stored_count(server) >= 3 and journaled(state) >= 1,
                90,
                "a stored batch and a journaled measurement",
                first,
            )
            first.stop(signal.SIGKILL)
            first.wait(30)
        assert stored_count(server) < len(planned_keys(campaign))
        assert server.task(task_id).status == TaskStatus.LEASED

        with running(
            start_agent(server.url, server.agent_key, state, "--batch-rows", "3", "--once")
        ) as second:
            assert second.wait() == 0, second.output()[-3000:]
        output = second.output()
        assert "resuming task" in output and "recovering" in output and "journaled measurement" in output
        task = server.task(task_id)
        assert task.status == TaskStatus.SUCCEEDED, (task.error, output[-3000:])
        assert task.attempts == 1 and task.lease_owner == first.agent_id == second.agent_id
        assert_exactly_planned(server, campaign)


def test_a_lost_agents_task_goes_back_to_the_queue_and_another_agent_finishes_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    campaign = {**SMALL_CAMPAIGN, "network_samples": 6, "isolated_samples": 3}
    state = tmp_path / "lost"
    with live_agent_server(sqlite_url) as server:
        task_id = server.queue_campaign(**campaign)
        lease = ("--lease-seconds", "2")
        with running(start_agent(server.url, server.agent_key, state, *lease)) as lost:
            # Killed mid-campaign: after two measurements, seen in its journal or on the server (its
            # heartbeat's progress can lag a fast campaign by a whole heartbeat).
            wait_until(lambda: journaled(state) + stored_count(server) >= 2, 90, "two measurements", lost)
            lost.stop(signal.SIGKILL)
            lost.wait(30)
        assert server.task(task_id).lease_owner == lost.agent_id

        with running(start_agent(server.url, server.agent_key, tmp_path / "other", *lease)) as other:
            wait_until(
                lambda: server.task(task_id).status == TaskStatus.SUCCEEDED,
                120,
                "the campaign to succeed",
                other,
            )
            other.stop(signal.SIGTERM)
            assert other.wait(30) == 0, other.output()[-3000:]
        task = server.task(task_id)
        assert task.attempts == 2 and task.lease_owner == other.agent_id != lost.agent_id
        assert "stopped" in other.output()
        assert_exactly_planned(server, campaign)
