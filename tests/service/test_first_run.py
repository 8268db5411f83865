"""The first run of `lpnet serve`: the admin key, the local device, and its bootstrap job.

The end-to-end tests start real `lpnet serve` processes on a temporary SQLite database with a tiny
profiling budget (resnet18 at 32x32, the quick timing protocol, a short fit), and kill or stop them.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from service.auth import create_api_key, generate_api_key, hash_api_key, key_prefix, revoke_api_key
from service.cli import main as cli_main
from service.config import FirstRunSettings, Settings
from service.db.base import utcnow
from service.db.models import ApiKey, Job, JobStatus, KeyScope
from service.db.session import make_engine, make_session_factory
from service.errors import Conflict
from service.first_run.bootstrap import lease_holder_gone, start_first_run
from service.first_run.keys import check_admin_keys, print_admin_key_report, try_it_lines
from service.job_handlers import serving_registry
from service.jobs.worker import Worker, worker_id
from service.main import create_app

DEVICE = "local-cpu"
KEY_LINE = re.compile(r"^\s*ADMIN=(lpn_[A-Za-z0-9_-]+)\s*$", re.MULTILINE)
ARCH = {"torchvision": "resnet18", "input_shape": [1, 3, 32, 32]}

# Whole resnet18 networks at 32x32 with a loose timing protocol: a few per second. Whatever the
# budget measures, the first run tops it up to the 26 networks a fit needs; one round of refining of
# a few seconds follows.
TINY_FIRST_RUN = {
    "LPNET_FIRST_RUN__ENABLED": "true",
    "LPNET_FIRST_RUN__BUDGET_MINUTES": "0.2",
    "LPNET_FIRST_RUN__FAMILIES": "resnet18",
    "LPNET_FIRST_RUN__IMAGE_SIZE": "32",
    "LPNET_FIRST_RUN__KINDS": "network",
    "LPNET_FIRST_RUN__QUICK_PROTOCOL": "true",
    "LPNET_FIRST_RUN__FIT__STEPS": "60",
    "LPNET_FIRST_RUN__FIT__MEMBERS": "2",
    "LPNET_FIRST_RUN__REFINE_MINUTES": "0.05",
    "LPNET_FIRST_RUN__REFINE_ROUNDS": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Server:
    """A running `lpnet serve` and the files its stdout and stderr go to."""

    process: subprocess.Popen[bytes]
    url: str
    stdout_path: Path
    stderr_path: Path

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@contextmanager
def lpnet_serve(data_dir: Path, log_dir: Path, name: str, env: dict[str, str]) -> Iterator[Server]:
    """Start `lpnet serve` on a free loopback port; stop it (SIGTERM) on exit unless it was killed."""
    port = free_port()
    stdout_path, stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    full_env = {**os.environ, "LPNET_DATA_DIR": str(data_dir), **env}
    full_env.pop("LPNET_DATABASE_URL", None)
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env,
            stdout=out,
            stderr=err,
        )
    server = Server(process, f"http://127.0.0.1:{port}", stdout_path, stderr_path)
    try:
        _wait_until(lambda: _answers(server), 60, lambda: f"server {name} did not start:\n{server.stderr}")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _answers(server: Server) -> bool:
    if server.process.poll() is not None:
        raise AssertionError(f"server exited with {server.process.returncode}:\n{server.stderr}")
    try:
        return httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _wait_until(condition: Callable[[], Any], timeout_s: float, describe: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(describe())


def _device(client: httpx.Client) -> dict[str, Any]:
    response = client.get(f"/v1/devices/{DEVICE}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _latency(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/latency", json={"device": DEVICE, "architecture": ARCH})


def _jobs(client: httpx.Client, kind: str) -> list[dict[str, Any]]:
    response = client.get("/v1/jobs", params={"kind": kind})
    assert response.status_code == 200, response.text
    jobs: list[dict[str, Any]] = response.json()["items"]
    return jobs


def _assert_progress_409(response: httpx.Response) -> dict[str, Any]:
    """A 409 no_predictor whose details carry the bootstrap's progress, and no latency."""
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "no_predictor"
    status: dict[str, Any] = error["details"]["status"]
    assert status["phase"] in ("profiling", "fitting")
    assert 0 <= status["percent"] < 100
    assert status["eta_seconds"] >= 0
    assert "total_ms" not in response.text
    return status


def _network_count(client: httpx.Client) -> int:
    return int(_device(client)["profiling"]["network"]["ok"])


@pytest.mark.slow
def test_first_run_profiles_fits_resumes_after_a_kill_refines_and_is_ready_at_once_later(
    tmp_path: Path,
) -> None:
    """Three starts of `lpnet serve` on one database, each checking what the first run did."""
    data_dir = tmp_path / "data"

    # 1. A key is printed; the device is registered and profiled, queries answer 409 with the progress;
    # the server is killed halfway.
    with lpnet_serve(data_dir, tmp_path, "first", TINY_FIRST_RUN) as server:
        keys = KEY_LINE.findall(server.stdout)
        assert len(keys) == 1, server.stdout
        admin = keys[0]
        assert "curl -s -X POST $API/v1/latency" in server.stdout
        with server.client(admin) as client:
            assert [d["name"] for d in client.get("/v1/devices").json()["items"]] == [DEVICE]
            device = _device(client)
            assert device["is_local"] and device["backend"] == "torch-cpu" and device["threads"] == 1
            _assert_progress_409(_latency(client))
            plan = client.post("/v1/plans", json={"device": DEVICE, "architecture": ARCH, "budget_ms": 1.0})
            _assert_progress_409(plan)
            _wait_until(lambda: _network_count(client) >= 3, 90, lambda: str(_device(client)))
            device = _device(client)
            assert device["status"]["phase"] == "profiling" and device["status"]["eta_seconds"] > 0
            server.process.kill()
            server.process.wait(timeout=10)
    measured_before = _network_count_offline(data_dir)
    jobs_before = _bootstrap_job_ids(data_dir)
    assert len(jobs_before) == 1

    # 2. The next start prints no key, registers no second device, and resumes the same job with the
    # measurements kept; the device gets ready.
    with lpnet_serve(data_dir, tmp_path, "resuming", TINY_FIRST_RUN) as server:
        assert "lpn_" not in server.stdout and "active admin key(s) exist" in server.stderr
        with server.client(admin) as client:
            assert len(client.get("/v1/devices").json()["items"]) == 1
            assert _network_count(client) >= measured_before
            phases = set()

            def ready() -> bool:
                phases.add(_device(client)["status"]["phase"])
                response = _latency(client)
                if response.status_code == 409:
                    _assert_progress_409(response)
                    return False
                assert response.status_code == 200, response.text
                return True

            _wait_until(ready, 180, lambda: f"not ready: {_device(client)}\n{server.stderr[-3000:]}")
            answer = _latency(client).json()
            assert answer["total_ms"] > 0 and answer["low_ms"] <= answer["total_ms"] <= answer["high_ms"]
            assert {"profiling", "fitting"} <= phases
            [resumed] = _jobs(client, "bootstrap")
            assert resumed["id"] == jobs_before[0]
            assert resumed["status"] == "succeeded" and resumed["result"]["samples"] >= measured_before

            _assert_refined_in_the_background(server, client)
        assert re.search(r"first run: resuming job \d+", server.stderr)
        assert re.search(r"first run: profiling 'local-cpu', \d+ % done, about .* left", server.stderr)

    # 3. Ready and refined at once: nothing queued, no key printed; the printed curl lines work.
    with lpnet_serve(data_dir, tmp_path, "ready", TINY_FIRST_RUN) as server:
        assert "lpn_" not in server.stdout
        with server.client(admin) as client:
            assert _latency(client).status_code == 200
            assert [job["status"] for job in _jobs(client, "bootstrap")] == ["succeeded"]
            assert [job["status"] for job in _jobs(client, "refine")] == ["succeeded"]
        port = int(server.url.rsplit(":", 1)[1])
        settings = Settings(port=port, first_run=FirstRunSettings(image_size=32))
        script = "\n".join(["set -e", f"ADMIN={admin}", *try_it_lines(settings)[:-1]])
        tried = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert tried.returncode == 0, tried.stderr
        assert '"phase":"ready"' in tried.stdout and '"total_ms"' in tried.stdout
        assert '"kind":"plan","status":"queued"' in tried.stdout


def _assert_refined_in_the_background(server: Server, client: httpx.Client) -> None:
    """Ready on version 1, the device refines in the background and then answers with version 2."""
    phases = set()

    def refined() -> bool:
        status = _device(client)["status"]
        phases.add(status["phase"])
        return status["refined"] is True

    _wait_until(refined, 120, lambda: f"not refined: {_device(client)}\n{server.stderr[-3000:]}")
    device = _device(client)
    assert "refining" in phases and device["status"]["phase"] == "ready"
    assert device["predictor"]["version"] == device["status"]["predictor_version"] == 2
    assert _latency(client).json()["predictor"]["version"] == 2
    assert [job["status"] for job in _jobs(client, "refine")] == ["succeeded"]


def _network_count_offline(data_dir: Path) -> int:
    from sqlalchemy import func

    from service.db.models import MeasurementStatus, NetworkMeasurement

    engine = make_engine(Settings(data_dir=data_dir).database_url)
    try:
        with make_session_factory(engine)() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(NetworkMeasurement)
                    .where(NetworkMeasurement.status == MeasurementStatus.OK)
                )
                or 0
            )
    finally:
        engine.dispose()


def _bootstrap_job_ids(data_dir: Path) -> list[int]:
    engine = make_engine(Settings(data_dir=data_dir).database_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(Job.id).where(Job.kind == "bootstrap").order_by(Job.id)))
    finally:
        engine.dispose()


def test_a_failed_first_run_is_shown_on_the_device_and_retried_at_the_next_start(
    factory: Any, sqlite_migrated_url: str
) -> None:
    first_run = FirstRunSettings(enabled=True, families=["no_such_net"], image_size=32, quick_protocol=True)
    settings = Settings(database_url=sqlite_migrated_url, first_run=first_run)
    job_id = start_first_run(settings, factory)
    assert job_id is not None
    worker = Worker(factory, serving_registry())
    claimed = worker.run_once()
    assert claimed is not None and claimed.id == job_id

    with factory() as session:
        admin = create_api_key(session, scope=KeyScope.ADMIN.value)[1]
        session.commit()
    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {admin}"})
    status = client.get(f"/v1/devices/{DEVICE}").json()["status"]
    assert status["phase"] == "failed" and status["job_id"] == job_id
    assert status["message"].startswith("first run failed:") and "no_such_net" in status["message"]
    assert "next `lpnet serve` retries" in status["message"]
    refused = client.post("/v1/latency", json={"device": DEVICE, "architecture": ARCH})
    assert refused.status_code == 409 and refused.json()["error"]["details"]["status"]["phase"] == "failed"
    assert [job["status"] for job in client.get("/v1/jobs").json()["items"]] == ["failed"]

    # The next start queues a new job for the same device (and would do so until one succeeds).
    retry = start_first_run(settings, factory)
    assert retry is not None and retry != job_id
    assert start_first_run(settings, factory) == retry  # one job at a time, not one per start
    assert [d["name"] for d in client.get("/v1/devices").json()["items"]] == [DEVICE]
    assert client.get(f"/v1/devices/{DEVICE}").json()["status"]["phase"] == "profiling"


def test_a_resumed_first_run_gets_a_new_deadline(sqlite_migrated_url: str, factory: Any) -> None:
    first_run = FirstRunSettings(enabled=True, families=["resnet18"], image_size=32, quick_protocol=True)
    settings = Settings(database_url=sqlite_migrated_url, first_run=first_run)
    job_id = start_first_run(settings, factory)
    assert job_id is not None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = utcnow() - timedelta(hours=1)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.deadline_at is not None
        # The server that ran it died long ago: past its deadline by now.
        job.status = JobStatus.RUNNING
        job.lease_owner = f"{socket.gethostname()}:{child.pid}:abcd1234"
        job.deadline_at = stale
        session.commit()
    assert start_first_run(settings, factory) == job_id
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.QUEUED and job.deadline_at is not None
        timeout = settings.worker.first_run_timeout_seconds + first_run.budget_minutes * 60
        assert job.deadline_at - utcnow() > timedelta(seconds=0.9 * timeout)


# Admin keys at start-up (in-process, on a real SQLite database) -----------------------------------------


@pytest.fixture
def factory(sqlite_migrated_url: str) -> Iterator[Any]:
    engine = make_engine(sqlite_migrated_url)
    yield make_session_factory(engine)
    engine.dispose()


def _report(check: Any, settings: Settings) -> tuple[str, str]:
    out, notes = io.StringIO(), io.StringIO()
    print_admin_key_report(check, settings, out, notes)
    return out.getvalue(), notes.getvalue()


def test_a_first_admin_key_is_created_and_shown_once(factory: Any, sqlite_migrated_url: str) -> None:
    settings = Settings(database_url=sqlite_migrated_url, first_run=FirstRunSettings(enabled=True))
    with factory() as session:
        check = check_admin_keys(session, settings)
        session.commit()
    out, _ = _report(check, settings)
    [key] = KEY_LINE.findall(out)
    with factory() as session:
        [row] = session.scalars(select(ApiKey)).all()
        assert row.scope == "admin" and row.key_hash == hash_api_key(key) and row.revoked_at is None
    assert f"/v1/devices/{DEVICE}" in out and '"verify": true' in out

    with factory() as session:
        again = check_admin_keys(session, settings)
        session.commit()
        assert len(session.scalars(select(ApiKey)).all()) == 1
    out, notes = _report(again, settings)
    assert out == "" and "1 active admin key(s) exist" in notes and "lpnet keys create" in notes


def test_no_key_is_created_when_the_first_run_is_off(factory: Any, sqlite_migrated_url: str) -> None:
    settings = Settings(database_url=sqlite_migrated_url)
    with factory() as session:
        check = check_admin_keys(session, settings)
        assert check.created_key is None and session.scalars(select(ApiKey)).all() == []


def test_the_configured_admin_key_is_stored_once_and_never_printed(
    factory: Any, sqlite_migrated_url: str
) -> None:
    configured = generate_api_key().key
    settings = Settings(
        database_url=sqlite_migrated_url,
        admin_key=SecretStr(configured),
        first_run=FirstRunSettings(enabled=True),
    )
    for _ in range(2):
        with factory() as session:
            check = check_admin_keys(session, settings)
            session.commit()
        out, notes = _report(check, settings)
        assert out == "" and configured not in notes and f"prefix {key_prefix(configured)}" in notes
    with factory() as session:
        [row] = session.scalars(select(ApiKey)).all()
        assert row.scope == KeyScope.ADMIN.value and row.key_hash == hash_api_key(configured)
        revoke_api_key(session, configured)
        session.commit()
    with factory() as session:
        check = check_admin_keys(session, settings)
        session.commit()
        assert check.configured_revoked and check.active_admin_keys == 0
        assert session.scalars(select(ApiKey)).one().revoked_at is not None


def test_a_configured_key_stored_with_another_scope_stops_the_server(
    factory: Any,
    sqlite_migrated_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with factory() as session:
        _row, reader = create_api_key(session, scope=KeyScope.READER.value)
        session.commit()
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_migrated_url)
    monkeypatch.setenv("LPNET_ADMIN_KEY", reader)
    assert cli_main(["serve", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "LPNET_ADMIN_KEY is stored as a reader key" in err and "Traceback" not in err and reader not in err
    with factory() as session, pytest.raises(Conflict):
        check_admin_keys(session, Settings(database_url=sqlite_migrated_url, admin_key=SecretStr(reader)))


def test_a_malformed_admin_key_is_refused_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LPNET_ADMIN_KEY", "secret")
    assert cli_main(["serve", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "LPNET_ADMIN_KEY must look like" in err and "Traceback" not in err and "secret" not in err


def test_first_run_settings_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LPNET_FIRST_RUN__FAMILIES", "resnet18, mobilenet_v2")
    monkeypatch.setenv("LPNET_FIRST_RUN__BUDGET_MINUTES", "2.5")
    monkeypatch.setenv("LPNET_FIRST_RUN__FIT__STEPS", "200")
    first = Settings().first_run
    assert first.families == ["resnet18", "mobilenet_v2"] and first.budget_minutes == 2.5
    assert first.fit.steps == 200 and first.image_size == 224 and not first.enabled  # off in the tests
    monkeypatch.setenv("LPNET_FIRST_RUN__DEVICE_NAME", "1234")
    with pytest.raises(ValueError, match="all digits"):
        Settings()


def test_a_lease_is_only_taken_back_from_a_process_that_is_gone() -> None:
    host = socket.gethostname()
    assert not lease_holder_gone(f"{host}:{os.getppid()}:abcd1234")  # pytest's parent: alive
    assert worker_id().startswith(f"{host}:{os.getpid()}:")  # the format the check reads
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert lease_holder_gone(f"{host}:{child.pid}:abcd1234")
    assert not lease_holder_gone(f"{host}:1:abcd1234")  # init is alive
    assert not lease_holder_gone(f"another-host:{child.pid}:abcd1234")
