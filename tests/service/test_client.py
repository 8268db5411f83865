"""`lpnet.client.Client` against a real server on loopback: every resource it covers, the typed errors
carrying the server's codes, and retries of 429 answers after the server's Retry-After."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from safetensors.torch import load as load_safetensors
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from lpnet.arch.groups import channel_layout
from lpnet.arch.onnx_io import export_onnx
from lpnet.client import (
    Client,
    Conflict,
    Forbidden,
    InvalidRequest,
    JobFailed,
    NotFound,
    RateLimited,
    RetryEvent,
    ServerUnreachable,
    Unauthorized,
)
from lpnet.gates.budget import width_grid
from service.auth import create_api_key
from service.config import QuotaSettings, Settings, WorkerSettings
from service.db.base import utcnow
from service.db.models import Job, KeyScope, ModelUpload, ProfileRun, RunSource
from service.db.session import make_engine, make_session_factory
from service.main import create_app
from service.predictors import store_predictor
from service.profiles import measurement_rows
from service.testing.tiny import TINY_INPUT_SHAPE, TINY_SPEC, TinyProfile, tiny_module
from tests.service.support import tiny_device
from tests.service.test_api_plans import budget_at

LiveServer = Callable[[FastAPI], AbstractContextManager[str]]
DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


@dataclass
class Served:
    """A served app whose device `tiny-cpu` has the tiny measurements and predictor."""

    url: str
    factory: sessionmaker[Session]
    keys: dict[str, str]
    device_id: int
    predictor_id: int

    def client(self, key: str = "reader", **options: Any) -> Client:
        return Client(self.url, self.keys.get(key, key), **options)


@contextmanager
def served(url: str, tiny_profile: TinyProfile, live_server: LiveServer, **settings: Any) -> Iterator[Served]:
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with factory() as session:
        keys = {
            "admin": create_api_key(session, scope=KeyScope.ADMIN.value)[1],
            "reader": create_api_key(session, scope=KeyScope.READER.value)[1],
        }
        device = tiny_device()
        session.add(device)
        session.flush()
        run = ProfileRun(device_id=device.id, source=RunSource.LOCAL, status="completed")
        session.add(run)
        session.flush()
        for measurement in tiny_profile.measurements:
            session.add_all(measurement_rows(measurement, device.id, run.id))
        predictor = store_predictor(session, device.id, tiny_profile.fitted)
        session.commit()
        device_id, predictor_id = device.id, predictor.id
    worker = settings.pop("worker", WorkerSettings(embedded=True, poll_seconds=0.1))
    try:
        with live_server(create_app(Settings(database_url=url, worker=worker, **settings))) as base_url:
            yield Served(base_url, factory, keys, device_id, predictor_id)
    finally:
        engine.dispose()


@pytest.fixture
def server(sqlite_migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer) -> Iterator[Served]:
    with served(sqlite_migrated_url, tiny_profile, live_server) as running:
        yield running


def test_devices_and_profiles(server: Served, tiny_profile: TinyProfile) -> None:
    with server.client("admin") as admin:
        created = admin.register_device("edge-1", TINY_SPEC.hardware, threads=1, environment={"cores": 2})
        assert created.name == "edge-1" and created.agent_key.startswith(created.agent_key_prefix)
        assert created.status.phase == "registered" and created.predictor is None
        assert {d.name for d in admin.devices()} == {"tiny-cpu", "edge-1"}
        assert admin.device("edge-1").id == admin.device(created.id).id == created.id
        tiny = admin.device("tiny-cpu")
        assert tiny.predictor is not None and tiny.predictor.id == server.predictor_id
        assert tiny.profiling["network"]["ok"] > 0

    measurements = tiny_profile.network_measurements[:3]
    batch = tiny_profile.batch("client-batch-1", measurements)
    with server.client(created.agent_key) as agent:
        first = agent.submit_profiles("edge-1", batch)
        assert first.device_id == created.id and not first.replayed
        assert first.stored["network"] == len(measurements)
        again = agent.submit_profiles("edge-1", tiny_profile.batch_json("client-batch-1", measurements))
        assert again.replayed and again.batch_id == first.batch_id
        with pytest.raises(Forbidden) as refused:
            agent.submit_profiles("tiny-cpu", tiny_profile.batch("client-batch-2", measurements))
        assert refused.value.status == 403 and refused.value.code == "permission_denied"


def test_latency_of_every_kind_of_architecture(
    server: Served, tiny_profile: TinyProfile, tmp_path: Path
) -> None:
    network = tiny_profile.network
    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(export_onnx(tiny_module(), TINY_INPUT_SHAPE))
    with server.client() as client:
        by_ir = client.latency("tiny-cpu", network)
        assert by_ir.device == "tiny-cpu" and by_ir.predictor.id == server.predictor_id
        assert by_ir.network_hash == network.content_hash
        assert by_ir.low_ms <= by_ir.total_ms <= by_ir.high_ms
        assert [layer.name for layer in by_ir.per_layer] == [layer.name for layer in network.layers]
        assert sum(layer.ms for layer in by_ir.per_layer) + by_ir.overhead_ms == pytest.approx(
            by_ir.total_ms, rel=1e-4
        )
        same = [
            client.latency(server.device_id, network.model_dump(mode="json")),
            client.latency("tiny-cpu", tiny_module(), input_shape=TINY_INPUT_SHAPE),
            client.latency("tiny-cpu", onnx_path.read_bytes()),
            client.latency("tiny-cpu", onnx_path),
        ]
        for answer in same:
            assert answer.network_hash == by_ir.network_hash
            assert answer.total_ms == pytest.approx(by_ir.total_ms, rel=1e-5)
        assert same[-1].network_name == "tiny.onnx"

        by_name = client.latency("tiny-cpu", "resnet18", input_shape=(1, 3, 32, 32))
        assert by_name.network_name == "resnet18" and by_name.total_ms > 0

        grid = width_grid(channel_layout(network))
        batch = client.latency_batch("tiny-cpu", network, [grid.full_widths, grid.min_widths])
        assert batch.count == 2 and batch.group_channels == list(grid.full_widths)
        assert batch.total_ms[0] == pytest.approx(by_ir.total_ms, rel=1e-4)
        assert batch.total_ms[1] < batch.total_ms[0]


def test_a_plan_is_created_waited_for_with_progress_and_read(
    server: Served, tiny_profile: TinyProfile
) -> None:
    budget = budget_at(tiny_profile, 0.5)
    seen: list[str] = []
    with server.client() as client:
        accepted = client.create_plan("tiny-cpu", tiny_profile.network, budget, round_to=8)
        assert accepted.kind == "plan" and accepted.status_url == f"/v1/plans/{accepted.job_id}"
        plan = client.wait_plan(
            accepted.job_id, progress=lambda p: seen.append(p.status), poll_seconds=0.1, timeout=120
        )
        assert plan.status == "succeeded" and plan.finished and plan.error is None
        assert seen and seen[-1] == "succeeded"
        assert plan.result is not None and plan.result["predicted"]["total_ms"] <= budget
        assert len(plan.result["widths"]) == len(channel_layout(tiny_profile.network).groups)
        assert client.plan(accepted.job_id).result == plan.result
        job = client.job(accepted.job_id)
        assert job.kind == "plan" and job.status == "succeeded"


def test_waiting_for_a_plan_that_fails_raises_with_its_error(
    sqlite_migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer
) -> None:
    # A plan must finish within LPNET_WORKER__PLAN_TIMEOUT_SECONDS of being queued: here it cannot.
    worker = WorkerSettings(embedded=True, poll_seconds=0.1, plan_timeout_seconds=0.01)
    with served(sqlite_migrated_url, tiny_profile, live_server, worker=worker) as server:
        with server.client() as client:
            accepted = client.create_plan("tiny-cpu", tiny_profile.network, budget_at(tiny_profile, 0.5))
            with pytest.raises(JobFailed) as failed:
                client.wait_plan(accepted.job_id, poll_seconds=0.1, timeout=60)
    assert failed.value.job.id == accepted.job_id and failed.value.job.status == "failed"
    assert failed.value.job.error and "timed out" in failed.value.job.error


def test_predictors_and_uploaded_models(server: Served, tiny_profile: TinyProfile) -> None:
    with server.client("admin") as client:
        [listed] = client.predictors("tiny-cpu")
        assert listed.id == server.predictor_id and listed.device == "tiny-cpu"
        assert client.predictor(listed.id).metrics == listed.metrics == client.predictor_metrics(listed.id)
        assert listed.metrics
        if listed.plot_url is not None:
            assert client.predictor_plot(listed.id).startswith(b"\x89PNG\r\n\x1a\n")
        else:
            with pytest.raises(NotFound, match="has no plot"):
                client.predictor_plot(listed.id)

        state = tiny_module().state_dict()
        upload = client.upload_model("tiny-weights", state, architecture=tiny_profile.network)
        assert upload.name == "tiny-weights" and upload.size_bytes > 0
        assert upload.architecture is not None
        stored = client.model(upload.id)
        assert stored.sha256 == upload.sha256 and stored.id == upload.id
        # What was stored is the state dict itself.
        with server.factory() as session:
            data = session.scalar(select(ModelUpload.weights).where(ModelUpload.id == upload.id))
        assert data is not None and set(load_safetensors(data)) == set(state)


def test_errors_are_typed_and_carry_the_servers_code(server: Served, tiny_profile: TinyProfile) -> None:
    with server.client() as client:
        with pytest.raises(NotFound) as missing:
            client.device("no-such-device")
        assert missing.value.status == 404 and missing.value.code == "not_found"
        assert "no-such-device" in missing.value.message
        with pytest.raises(NotFound) as missing_plan:
            client.plan(999_999)
        assert missing_plan.value.code == "not_found"
        with pytest.raises(Forbidden) as forbidden:
            client.register_device("nope", "cpu")
        assert forbidden.value.status == 403 and forbidden.value.code == "permission_denied"
        with pytest.raises(InvalidRequest) as invalid:
            client.create_plan("tiny-cpu", tiny_profile.network, -1.0)
        assert invalid.value.status == 422 and invalid.value.code == "validation_error"
        assert any(e["field"].endswith("budget_ms") for e in invalid.value.details["errors"])
        with pytest.raises(InvalidRequest) as unknown_model:
            client.latency("tiny-cpu", "resnet_nope")
        assert unknown_model.value.code == "unknown_model"
    with server.client("admin") as admin:
        admin.register_device("bare", TINY_SPEC.hardware)
        with pytest.raises(Conflict) as conflict:
            admin.latency("bare", tiny_profile.network)
        assert conflict.value.status == 409 and conflict.value.code == "no_predictor"
    with server.client("lpn_not_a_key") as stranger:
        with pytest.raises(Unauthorized) as unauthorized:
            stranger.devices()
        assert unauthorized.value.status == 401 and unauthorized.value.code == "unauthenticated"

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    retried: list[RetryEvent] = []
    with Client(f"http://127.0.0.1:{port}", "k", retries=1, on_retry=retried.append) as nowhere:
        with pytest.raises(ServerUnreachable, match="no answer"):
            nowhere.devices()
    assert [event.status for event in retried] == [None]


def test_a_429_is_retried_after_the_servers_retry_after(
    sqlite_migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer
) -> None:
    quota = QuotaSettings(active_plans=100, plans_per_hour=1)
    no_worker = WorkerSettings(embedded=False)
    with served(sqlite_migrated_url, tiny_profile, live_server, quota=quota, worker=no_worker) as server:
        budget = budget_at(tiny_profile, 0.5)
        with server.client(retries=0) as impatient:
            first = impatient.create_plan("tiny-cpu", tiny_profile.network, budget)
            with pytest.raises(RateLimited) as limited:
                impatient.create_plan("tiny-cpu", tiny_profile.network, budget)
        assert limited.value.status == 429 and limited.value.code == "quota_exceeded"
        assert limited.value.details["limit"] == "plans_per_hour"
        assert limited.value.retry_after is not None and limited.value.retry_after > 3000

        # A Retry-After beyond what the client waits out is raised at once.
        started = time.monotonic()
        with server.client(retries=3, max_retry_wait=10) as client:
            with pytest.raises(RateLimited):
                client.create_plan("tiny-cpu", tiny_profile.network, budget)
        assert time.monotonic() - started < 5

        # The hour's only plan leaves the quota window in about 2 s: the server says so, and the
        # client waits that long and gets through.
        with server.factory() as session:
            session.execute(
                update(Job)
                .where(Job.id == first.job_id)
                .values(created_at=utcnow() - timedelta(minutes=59, seconds=58))
            )
            session.commit()
        events: list[RetryEvent] = []
        started = time.monotonic()
        with server.client(retries=3, max_retry_wait=10, on_retry=events.append) as client:
            accepted = client.create_plan("tiny-cpu", tiny_profile.network, budget)
        elapsed = time.monotonic() - started
        assert accepted.job_id != first.job_id
        assert [event.status for event in events] == [429]
        assert 1 <= events[0].wait_seconds <= 3 and elapsed >= events[0].wait_seconds
        assert isinstance(events[0].error, RateLimited) and events[0].error.code == "quota_exceeded"


def test_the_documented_client_example_runs(server: Served, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    [example] = [block for block in blocks if "Client(" in block]
    for placeholder, value in [
        ('"http://127.0.0.1:8000"', repr(server.url)),
        ('"lpn_..."', repr(server.keys["reader"])),
        ('"laptop-1t"', '"tiny-cpu"'),
    ]:
        assert placeholder in example
        example = example.replace(placeholder, value)
    namespace: dict[str, Any] = {}
    exec(compile(example, str(DOC), "exec"), namespace)
    plan = namespace["plan"]
    assert plan.status == "succeeded" and plan.result["predicted"]["total_ms"] <= plan.budget_ms
    assert "succeeded" in capsys.readouterr().out
