"""Plans verified on a remote device through a real `lpnet agent` process, deferred without holding a
worker while they wait for it; an agent that registers its device with an admin key and keeps the agent
key it obtained."""

from __future__ import annotations

import json
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from profiler.agent.client import AgentError
from profiler.agent.config import AgentLoopConfig
from profiler.agent.loop import AgentLoop
from profiler.speed import PROBE_VERSION, typical_slowdown
from service.auth import create_api_key
from service.config import FitSettings, get_settings
from service.db.base import utcnow
from service.db.models import AgentTask, ApiKey, Device, Job, KeyScope, TaskKind, TaskStatus
from service.jobs.queue import wake_job
from service.predictors import FittedPredictor, fit_from_samples, store_predictor
from service.profiles import measurement_rows
from service.testing.tiny import TinyProfile
from service.training_set import training_samples
from tests.service.support import feasible_budget
from tests.service.test_agent_campaigns import (
    LiveServer,
    live_agent_server,
    running,
    start_agent,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_verified_plan_for_a_remote_device_completes_once_its_agent_measured_it(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_profile: TinyProfile,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The plan job runs in the server's embedded worker, which reads these settings.
    monkeypatch.setenv("LPNET_AGENT__VERIFY_PROTOCOL", "quick")
    monkeypatch.setenv("LPNET_AGENT__VERIFY_TIMEOUT_SECONDS", "120")
    get_settings.cache_clear()
    db_url: str = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    with live_agent_server(db_url, embedded_worker=True) as server:
        from service.db.models import ProfileRun, RunSource

        with server.factory() as session:
            run = ProfileRun(device_id=server.device_id, source=RunSource.AGENT, status="completed")
            session.add(run)
            session.flush()
            for measurement in tiny_profile.measurements:
                session.add_all(measurement_rows(measurement, server.device_id, run.id))
            session.flush()
            # The profile was speed-probed: the predictor is fitted at its nominal speed, and the
            # agent's verifications are judged at that speed.
            training = training_samples(session, server.device_id)
            assert training.labels == "probe" and training.nominal_probe_ms is not None
            fitted = fit_from_samples(training, settings=FitSettings(steps=200, members=3))
            store_predictor(session, server.device_id, fitted)
            session.commit()
        plan_request = verified_plan_request(server, tiny_profile, fitted)
        with running(start_agent(server.url, server.agent_key, tmp_path / "agent")) as agent:
            accepted = server.post("/v1/plans", plan_request)
            assert accepted.status_code == 202, accepted.text
            plan_url = accepted.json()["status_url"]

            def finished() -> dict[str, object] | None:
                plan: dict[str, object] = server.get(plan_url).json()
                return plan if plan["status"] in ("succeeded", "failed") else None

            plan = wait_until(finished, 120, "the plan to finish", agent)
            agent.stop(signal.SIGTERM)
            assert agent.wait(30) == 0, agent.output()[-3000:]
        assert plan["status"] == "succeeded", (plan["error"], agent.output()[-3000:])
        result = plan["result"]
        assert isinstance(result, dict) and result["verified"] is True and result["measured_ms"] > 0
        rounds = [r for r in result["rounds"] if r["measured_ms"] is not None]
        assert rounds and all(
            r["nominal_probe_ms"] == pytest.approx(training.nominal_probe_ms) for r in rounds
        )
        with server.factory() as session:
            tasks = list(session.scalars(select(AgentTask).where(AgentTask.job_id == plan["id"])))
        assert tasks and all(t.kind == TaskKind.VERIFY and t.status == TaskStatus.SUCCEEDED for t in tasks)
        assert all(t.lease_owner == agent.agent_id and t.result is not None for t in tasks)
        # Every measured round is one of the agent's measurements, timed against the speed probe and
        # judged at the predictor's nominal speed.
        results = {t.result["measured_ms"]: t.result for t in tasks if t.result is not None}
        for round_ in rounds:
            measured = results[round_["measured_raw_ms"]]
            assert measured["probe_version"] == PROBE_VERSION and round_["probe_ms"] == measured["probe_ms"]
            assert round_["measured_ms"] == pytest.approx(
                measured["relative_latency"] * training.nominal_probe_ms
            )
        assert "verify task" in agent.output()


def test_an_admin_key_registers_the_device_once_and_the_agent_key_is_kept(
    sqlite_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "agent"
    with live_agent_server(sqlite_url) as server:
        with running(start_agent(server.url, server.admin, state, "--device", "edge-new", "--once")) as first:
            assert first.wait() == 0, first.output()[-3000:]
        kept = json.loads((state / "agent.json").read_text())
        assert kept["device_name"] == "edge-new" and kept["agent_key"].startswith("lpn_")
        assert (state / "agent.json").stat().st_mode & 0o077 == 0  # the key is for this user only
        with server.factory() as session:
            device = session.scalars(select(Device).where(Device.name == "edge-new")).one()
            assert device.is_local is False and device.backend == "torch-cpu" and device.threads == 1
            assert device.environment["hostname"]
            keys = list(session.scalars(select(ApiKey).where(ApiKey.device_id == device.id)))
        assert [key.scope for key in keys] == ["agent"]

        # A restart with the same command needs the admin key no more: the kept agent key is used.
        prefix = server.admin[:12]
        assert httpx.delete(f"{server.url}/v1/keys/{prefix}", headers=server.headers()).status_code == 200
        with running(
            start_agent(server.url, server.admin, state, "--device", "edge-new", "--once")
        ) as second:
            assert second.wait() == 0, second.output()[-3000:]
        assert "serving device edge-new" in second.output()
        assert json.loads((state / "agent.json").read_text())["agent_id"] == kept["agent_id"]
        with server.factory() as session:
            assert (
                session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.device_id == device.id))
                == 1
            )

        # An agent key of another device is refused, with a clear message.
        config = AgentLoopConfig(
            server=server.url,
            token=server.agent_key,
            device="edge-new",
            state_dir=tmp_path / "wrong",
            once=True,
        )
        with pytest.raises(AgentError, match="agent key of another device"):
            AgentLoop(config).connect()


def store_probed_predictor(server: LiveServer, tiny_profile: TinyProfile) -> tuple[float, FittedPredictor]:
    """Store the tiny profile as the remote device's agent run and fit its predictor at the probe speed."""
    from service.db.models import ProfileRun, RunSource

    with server.factory() as session:
        run = ProfileRun(device_id=server.device_id, source=RunSource.AGENT, status="completed")
        session.add(run)
        session.flush()
        for measurement in tiny_profile.measurements:
            session.add_all(measurement_rows(measurement, server.device_id, run.id))
        session.flush()
        training = training_samples(session, server.device_id)
        assert training.nominal_probe_ms is not None
        # Every row with a whole-network timing (whole networks and in-context runs) has a probe.
        probes = [m.probe_ms for m in tiny_profile.measurements if m.status == "ok" and m.probe_ms]
        assert training.typical_slowdown == pytest.approx(typical_slowdown(probes))
        fitted = fit_from_samples(training, settings=FitSettings(steps=200, members=3))
        assert fitted.metrics["typical_slowdown"] == pytest.approx(training.typical_slowdown)
        store_predictor(session, server.device_id, fitted)
        session.commit()
    return training.nominal_probe_ms, fitted


def verified_plan_request(
    server: LiveServer, tiny_profile: TinyProfile, fitted: FittedPredictor
) -> dict[str, Any]:
    """A verified plan of the tiny network on the server's remote device, at 0.6 of its feasible range."""
    return {
        "device": server.device_name,
        "architecture": tiny_profile.network.model_dump(mode="json"),
        "budget_ms": feasible_budget(fitted.artifact, tiny_profile.network, 0.6),
        "options": {"verify": True},
    }


def reader_key(server: LiveServer) -> str:
    with server.factory() as session:
        key = create_api_key(session, scope=KeyScope.READER.value)[1]
        session.commit()
    return key


def verify_settings(monkeypatch: pytest.MonkeyPatch, timeout_seconds: float) -> None:
    """The embedded worker's agent settings (it reads the environment's)."""
    monkeypatch.setenv("LPNET_AGENT__VERIFY_PROTOCOL", "quick")
    monkeypatch.setenv("LPNET_AGENT__VERIFY_TIMEOUT_SECONDS", str(timeout_seconds))
    get_settings.cache_clear()


def waiting_for_agent(server: LiveServer, plan_url: str, key: str | None = None) -> dict[str, Any] | None:
    plan: dict[str, Any] = server.get(plan_url, key).json()
    assert plan["status"] in ("queued", "running"), plan
    return plan if (plan["progress"] or {}).get("phase") == "waiting_for_agent" else None


def finished(server: LiveServer, plan_url: str, key: str | None = None) -> dict[str, Any] | None:
    plan: dict[str, Any] = server.get(plan_url, key).json()
    return plan if plan["status"] in ("succeeded", "failed") else None


def job_row(server: LiveServer, job_id: int) -> Job:
    with server.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def verify_tasks(server: LiveServer, job_id: int) -> list[AgentTask]:
    with server.factory() as session:
        return list(
            session.scalars(select(AgentTask).where(AgentTask.job_id == job_id).order_by(AgentTask.id))
        )


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_plan_waiting_for_its_agent_holds_no_worker_and_finishes_once_the_agent_measured(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_profile: TinyProfile,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verify_settings(monkeypatch, 300)
    db_url: str = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    # One embedded worker thread (the default) runs every job.
    with live_agent_server(db_url, embedded_worker=True) as server:
        nominal_probe_ms, fitted = store_probed_predictor(server, tiny_profile)
        reader = reader_key(server)
        plan_request = verified_plan_request(server, tiny_profile, fitted)
        # A reader may verify on a remote device: its agent measures there.
        accepted = server.post("/v1/plans", plan_request, key=reader)
        assert accepted.status_code == 202, accepted.text
        plan_id, plan_url = accepted.json()["job_id"], accepted.json()["status_url"]
        waiting = wait_until(lambda: waiting_for_agent(server, plan_url, reader), 120, "the plan to wait")
        assert waiting["status"] == "running"
        assert f"waiting for the agent of {server.device_name!r}" in waiting["progress"]["message"]
        assert job_row(server, plan_id).lease_owner is None  # no worker holds it

        # The only worker thread is free meanwhile: another plan runs to completion.
        other = server.post("/v1/plans", {**plan_request, "options": {}}, key=reader)
        assert other.status_code == 202, other.text
        other_plan = wait_until(
            lambda: finished(server, other.json()["status_url"], reader), 120, "the other plan"
        )
        assert other_plan["status"] == "succeeded", other_plan["error"]
        still = server.get(plan_url, reader).json()
        assert still["status"] == "running" and still["progress"]["phase"] == "waiting_for_agent"
        assert [t.status for t in verify_tasks(server, plan_id)] == [TaskStatus.QUEUED]

        with running(start_agent(server.url, server.agent_key, tmp_path / "agent")) as agent:
            plan = wait_until(lambda: finished(server, plan_url, reader), 180, "the plan to finish", agent)
            agent.stop(signal.SIGTERM)
            assert agent.wait(30) == 0, agent.output()[-3000:]
        assert plan["status"] == "succeeded", (plan["error"], agent.output()[-3000:])
        result = plan["result"]
        assert result["verified"] is True and result["measured_ms"] > 0
        tasks = verify_tasks(server, plan_id)
        assert tasks and all(
            t.status == TaskStatus.SUCCEEDED and t.lease_owner == agent.agent_id for t in tasks
        )
        # Every measured round is one of the agent's measurements, judged at the predictor's speed.
        results = {t.result["measured_ms"]: t.result for t in tasks if t.result is not None}
        rounds = [r for r in result["rounds"] if r["measured_ms"] is not None]
        assert rounds
        for round_ in rounds:
            measured = results[round_["measured_raw_ms"]]
            assert round_["measured_ms"] == pytest.approx(measured["relative_latency"] * nominal_probe_ms)
        # Waiting is not failing: every resumption of the plan ran within its first attempt.
        assert job_row(server, plan_id).attempts == 1


def test_a_plan_whose_agent_never_comes_fails_once_its_verify_task_is_past_the_timeout(
    sqlite_url: str, tiny_profile: TinyProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    verify_settings(monkeypatch, 10)
    with live_agent_server(sqlite_url, embedded_worker=True) as server:
        _, fitted = store_probed_predictor(server, tiny_profile)
        plan_request = verified_plan_request(server, tiny_profile, fitted)
        accepted = server.post("/v1/plans", plan_request)
        assert accepted.status_code == 202, accepted.text
        plan_id, plan_url = accepted.json()["job_id"], accepted.json()["status_url"]
        wait_until(lambda: waiting_for_agent(server, plan_url), 120, "the plan to wait")
        [task] = verify_tasks(server, plan_id)
        # A task an earlier run of the plan asked for, for a network the plan no longer measures.
        with server.factory() as session:
            stale = AgentTask(
                device_id=server.device_id,
                kind=TaskKind.VERIFY,
                job_id=plan_id,
                payload={**task.payload, "network_hash": "0" * 64},
            )
            session.add(stale)
            wake_job(session, plan_id)
            session.commit()
            stale_id = stale.id

        def stale_cancelled() -> AgentTask | None:
            found = {t.id: t for t in verify_tasks(server, plan_id)}[stale_id]
            return found if found.status == TaskStatus.CANCELLED else None

        # The woken plan runs again, measures only its own network, and drops the other task.
        dropped = wait_until(stale_cancelled, 30, "the stale task to be cancelled")
        assert dropped.error == "the resumed plan measures another network instead"
        assert waiting_for_agent(server, plan_url) is not None
        plan = wait_until(lambda: finished(server, plan_url), 60, "the plan to fail")
        waited = (utcnow() - task.created_at).total_seconds()
        assert plan["status"] == "failed" and waited >= 10
        assert (
            f"measured the pruned network within 10 s (verify task {task.id} was never leased"
            in plan["error"]
        )
        timed_out = {t.id: t for t in verify_tasks(server, plan_id)}[task.id]
        assert (
            timed_out.status == TaskStatus.CANCELLED
            and timed_out.error == "the plan stopped waiting after 10 s"
        )
        assert job_row(server, plan_id).attempts == 1


def test_a_waiting_plan_past_its_deadline_fails_and_cancels_what_it_asked_the_agent(
    sqlite_url: str, tiny_profile: TinyProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    verify_settings(monkeypatch, 300)
    with live_agent_server(sqlite_url, embedded_worker=True) as server:
        _, fitted = store_probed_predictor(server, tiny_profile)
        plan_request = verified_plan_request(server, tiny_profile, fitted)
        accepted = server.post("/v1/plans", plan_request)
        assert accepted.status_code == 202, accepted.text
        plan_id, plan_url = accepted.json()["job_id"], accepted.json()["status_url"]
        waiting = wait_until(lambda: waiting_for_agent(server, plan_url), 120, "the plan to wait")
        assert waiting["deadline_at"] is not None
        with server.factory() as session:
            session.execute(
                update(Job).where(Job.id == plan_id).values(deadline_at=utcnow() - timedelta(seconds=1))
            )
            session.commit()
        started = time.monotonic()
        plan = wait_until(lambda: finished(server, plan_url), 30, "the plan to fail")
        assert time.monotonic() - started < 10  # swept at the worker's next poll, not after its recheck
        assert plan["status"] == "failed" and plan["error"].startswith("timed out after ")
        # The sweep fails the plan, then cancels its tasks in a transaction of their own, right after.
        [task] = wait_until(
            lambda: [t for t in verify_tasks(server, plan_id) if t.status == TaskStatus.CANCELLED],
            10,
            "the verify task to be cancelled",
        )
        assert task.error == f"plan {plan_id} failed: {plan['error']}"
        assert len(verify_tasks(server, plan_id)) == 1
