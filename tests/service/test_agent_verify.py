"""Plans verified on a remote device through a real `lpnet agent` process; an agent that registers its
device with an admin key and keeps the agent key it obtained."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from profiler.agent_loop import AgentError, AgentLoop, AgentLoopConfig
from profiler.speed import PROBE_VERSION
from service.config import FitSettings, get_settings
from service.db.models import AgentTask, ApiKey, Device, TaskKind, TaskStatus
from service.predictors import fit_from_samples, store_predictor, training_samples
from service.profiles import measurement_rows
from tests.service.support import TinyProfile, feasible_budget
from tests.service.test_agent_campaigns import live_agent_server, running, start_agent, wait_until


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
        plan_request = {
            "device": server.device_name,
            "architecture": tiny_profile.network.model_dump(mode="json"),
            "budget_ms": feasible_budget(fitted.artifact, tiny_profile.network, 0.6),
            "options": {"verify": True},
        }
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
