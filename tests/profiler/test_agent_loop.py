"""The agent loop's own parts: configuration, its state on disk, the outbox across a server outage and
a restart, and exiting with a clear message when there is no server."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from lpnet.arch.ir import Network
from profiler.agent.cli import build_parser, config_from_args
from profiler.agent.client import AgentError
from profiler.agent.config import AgentLoopConfig
from profiler.agent.loop import AgentLoop
from profiler.agent.state import AgentState
from service.auth import create_api_key
from service.config import Settings, WorkerSettings
from service.db.base import utcnow
from service.db.migrate import upgrade
from service.db.models import AgentTask, Device, KeyScope, TaskKind, TaskStatus
from service.db.session import make_engine, make_session_factory
from service.main import create_app


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_flags_fall_back_to_the_environment(tmp_path: Path) -> None:
    env = {
        "LPNET_SERVER": "http://server:8000/",
        "LPNET_API_KEY": "lpn_key",
        "LPNET_AGENT_DEVICE": "edge-1",
        "LPNET_AGENT_STATE_DIR": str(tmp_path / "state"),
    }
    config = config_from_args(parse(), env)
    assert (config.server, config.token, config.device) == ("http://server:8000", "lpn_key", "edge-1")
    assert config.state_dir == tmp_path / "state" and config.poll_seconds == 5.0 and not config.once
    flags = parse(
        "--server", "https://other", "--token", "t", "--device", "d", "--once", "--profile-minutes", "3"
    )
    config = config_from_args(flags, env)
    assert (config.server, config.token, config.device, config.once, config.profile_minutes) == (
        "https://other",
        "t",
        "d",
        True,
        3.0,
    )
    assert config_from_args(parse("--server", "http://s", "--token", "t"), {}).state_dir == Path(
        ".lpnet-agent"
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ((), {"LPNET_API_KEY": "t"}, "--server URL or $LPNET_SERVER"),
        (("--server", "http://s"), {}, "--token KEY or $LPNET_API_KEY"),
        (("--server", "server:8000", "--token", "t"), {}, "http(s) URL"),
        (("--server", "http://s", "--token", "t", "--poll-seconds", "0"), {}, "--poll-seconds"),
        (("--server", "http://s", "--token", "t", "--profile-minutes", "-1"), {}, "--profile-minutes"),
    ],
)
def test_bad_configuration_is_a_clear_error(argv: tuple[str, ...], env: dict[str, str], message: str) -> None:
    with pytest.raises(AgentError, match=message.replace("$", r"\$").replace("(", r"\(").replace(")", r"\)")):
        config_from_args(parse(*argv), env)


def test_lpnet_agent_takes_the_same_flags() -> None:
    from service.cli import build_parser as lpnet_parser

    subparsers = next(a for a in lpnet_parser()._actions if isinstance(a, argparse._SubParsersAction))
    lpnet_agent = subparsers.choices["agent"]

    def flags(parser: argparse.ArgumentParser) -> set[str]:
        return {option for action in parser._actions for option in action.option_strings}

    assert flags(lpnet_agent) == flags(build_parser())
    assert {"--server", "--token", "--device", "--state-dir", "--poll-seconds", "--once"} <= flags(
        build_parser()
    )
    assert {"--backend", "--threads", "--profile-minutes"} <= flags(build_parser())


def test_the_state_survives_a_restart_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    state = AgentState.load(path)
    assert ":" in state.agent_id and state.agent_key is None
    state.agent_key, state.device_id, state.task_id = "lpn_secret", 3, 7
    state.save(path)
    assert path.stat().st_mode & 0o077 == 0
    again = AgentState.load(path)
    assert again == state
    path.write_text("{not json")
    with pytest.raises(AgentError, match="unreadable"):
        AgentState.load(path)


def test_once_without_a_server_exits_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "profiler.agent", "--server", url, "--token", "t", "--once"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("LPNET_")},
        )
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"error: {url} is unreachable" in done.stderr
    assert time.monotonic() - started < 60
    assert (tmp_path / ".lpnet-agent" / "agent.json").exists()


@contextmanager
def serve_on(app: FastAPI, sock: socket.socket) -> Iterator[None]:
    """Serve `app` on an already bound socket (its port known before the server starts)."""
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


def test_results_wait_in_the_outbox_through_an_outage_and_a_restart(
    sqlite_url: str, tmp_path: Path, tiny_network: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server here only answers the agent: no first-run profiling of this machine.
    monkeypatch.setenv("LPNET_FIRST_RUN__ENABLED", "false")
    monkeypatch.setenv("LPNET_DATA_DIR", str(tmp_path / "data"))
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server's port, refusing connections until it serves
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with factory() as session:
            device = Device(
                name="edge", hardware="cpu", backend="torch-cpu", threads=1, batch_size=1, environment={}
            )
            session.add(device)
            session.flush()
            token = create_api_key(session, scope=KeyScope.AGENT.value, device=device)[1]
            session.commit()
            device_id = device.id
        config = AgentLoopConfig(server=url, token=token, state_dir=tmp_path / "state", poll_seconds=0.1)
        loop = AgentLoop(config)
        with factory() as session:
            task = AgentTask(
                device_id=device_id,
                kind=TaskKind.VERIFY,
                status=TaskStatus.LEASED,
                payload={"network_hash": tiny_network.content_hash},
                lease_owner=loop.agent_id,
                lease_expires_at=utcnow(),
                attempts=1,
            )
            session.add(task)
            session.commit()
            task_id = task.id
        result = {"measured_ms": 0.42, "network_hash": tiny_network.content_hash}
        loop.finish({"id": task_id}, "complete", {"result": result})  # the server is down
        outbox = tmp_path / "state" / "outbox"
        assert [p.name for p in outbox.glob("*.json")] == [f"task-{task_id:010d}-complete.json"]
        loop.server.close()

        restarted = AgentLoop(config)  # a new process reads the same state directory
        assert restarted.agent_id == loop.agent_id
        app = create_app(Settings(database_url=sqlite_url, worker=WorkerSettings(embedded=False)))
        with serve_on(app, sock):
            assert restarted.outbox.flush() == 1
            assert restarted.outbox.flush() == 0
        restarted.server.close()
        with factory() as session:
            stored = session.get(AgentTask, task_id)
            assert stored is not None and stored.status == TaskStatus.SUCCEEDED
            unset = ("p10_ms", "p90_ms", "repetitions", "probe_ms", "relative_latency", "probe_version")
            assert stored.result == {**result, **dict.fromkeys(unset)}
        assert not list(outbox.glob("*.json"))
    finally:
        sock.close()
        engine.dispose()


def test_sigterm_mid_campaign_hands_over_what_was_measured_and_keeps_the_lease(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop runs in this process's main thread and gets a real SIGTERM half-way through a campaign."""
    from sqlalchemy import func, select

    from service.db.models import NetworkMeasurement
    from tests.service.conftest import serve_in_thread

    monkeypatch.setenv("LPNET_FIRST_RUN__ENABLED", "false")
    monkeypatch.setenv("LPNET_DATA_DIR", str(tmp_path / "data"))
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    with factory() as session:
        device = Device(
            name="edge", hardware="cpu", backend="torch-cpu", threads=1, batch_size=1, environment={}
        )
        session.add(device)
        session.flush()
        token = create_api_key(session, scope=KeyScope.AGENT.value, device=device)[1]
        payload = {"families": ["resnet18"], "kinds": ["network"], "image_size": 32, "network_samples": 12}
        task = AgentTask(
            device_id=device.id, kind=TaskKind.PROFILE_CAMPAIGN, payload={**payload, "quick": True}
        )
        session.add(task)
        session.commit()
        task_id = task.id

    def stored() -> int:
        with factory() as session:
            return int(session.scalar(select(func.count()).select_from(NetworkMeasurement)) or 0)

    finished = threading.Event()

    def stop_when_half_way() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not finished.is_set():
            if stored() >= 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    # A SIGTERM that came after the loop (it would not) must not end the test run: the loop restores this.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    app = create_app(Settings(database_url=sqlite_url, worker=WorkerSettings(embedded=False)))
    try:
        with serve_in_thread(app) as url:
            config = AgentLoopConfig(server=url, token=token, state_dir=tmp_path / "state", batch_rows=2)
            loop = AgentLoop(config)
            threading.Thread(target=stop_when_half_way, daemon=True).start()
            caplog.set_level("INFO")
            try:
                assert loop.run() == 0
            finally:
                finished.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert loop.stop.is_set()
    interrupted = re.search(r"interrupted after (\d+) measurement", caplog.text)
    assert interrupted is not None, caplog.text[-3000:]
    measured = int(interrupted.group(1))
    on_server = stored()
    # Stopped half-way: the signal came once two rows were stored, well before the twelfth sample.
    assert on_server >= 2 and measured < 12
    # What it counted is on the server; the one it was writing when stopped may be there too
    # (the signal can land after the spool flushed that row and before the runner counted it).
    assert measured <= on_server <= measured + 1
    assert not list((tmp_path / "state" / "spool").glob("*/pending/*.json"))
    with factory() as session:
        kept = session.get(AgentTask, task_id)
        assert kept is not None and kept.status == TaskStatus.LEASED and kept.lease_owner == loop.agent_id
    engine.dispose()


def test_a_system_devices_tasks_fail_naming_the_policy_in_a_process_that_keeps_freed_memory(
    sqlite_url: str, tmp_path: Path, tiny_network: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import func, select

    from profiler.environment import AllocatorPolicy, apply_allocator_policy
    from profiler.protocol import TimingProtocol
    from service.db.models import NetworkMeasurement
    from tests.service.conftest import serve_in_thread

    monkeypatch.setenv("LPNET_FIRST_RUN__ENABLED", "false")
    monkeypatch.setenv("LPNET_DATA_DIR", str(tmp_path / "data"))
    apply_allocator_policy(AllocatorPolicy.RETAIN)  # this process keeps freed memory from here on
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    with factory() as session:
        device = Device(
            name="edge",
            hardware="cpu",
            backend="torch-cpu",
            threads=1,
            batch_size=1,
            allocator=AllocatorPolicy.SYSTEM.value,
            environment={},
        )
        session.add(device)
        session.flush()
        token = create_api_key(session, scope=KeyScope.AGENT.value, device=device)[1]
        campaign = {"families": ["resnet18"], "kinds": ["network"], "image_size": 32, "network_samples": 2}
        verify = {
            "architecture": tiny_network.model_dump(mode="json"),
            "protocol": TimingProtocol.quick().model_dump(mode="json"),
        }
        session.add_all(
            [
                AgentTask(device_id=device.id, kind=TaskKind.PROFILE_CAMPAIGN, payload=campaign),
                AgentTask(device_id=device.id, kind=TaskKind.VERIFY, payload=verify),
            ]
        )
        session.commit()
    app = create_app(Settings(database_url=sqlite_url, worker=WorkerSettings(embedded=False)))
    with serve_in_thread(app) as url:
        config = AgentLoopConfig(server=url, token=token, state_dir=tmp_path / "state", once=True)
        assert AgentLoop(config).run() == 0
    with factory() as session:
        tasks = session.scalars(select(AgentTask).order_by(AgentTask.id)).all()
        assert [task.status for task in tasks] == [TaskStatus.FAILED, TaskStatus.FAILED]
        for task in tasks:
            assert task.error is not None and "allocator policy is 'system'" in task.error, task.error
        assert session.scalar(select(func.count()).select_from(NetworkMeasurement)) == 0
    engine.dispose()
