"""The agent API: hello, lease, heartbeat, complete, fail; campaigns, lapsed leases, bad input, races."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from profiler.environment import collect_environment
from service.agents.tasks import lease_task, reclaim_lapsed
from service.auth import create_api_key
from service.config import AgentSettings, Settings, WorkerSettings, get_settings
from service.db.base import utcnow
from service.db.migrate import upgrade
from service.db.models import AgentTask, Device, KeyScope, TaskStatus
from service.job_handlers import default_registry
from service.jobs.worker import Worker
from service.main import create_app
from service.testing.tiny import TinyProfile, tiny_network
from tests.service.conftest import serve_in_thread
from tests.service.support import Api, api_client
from tests.service.test_api_plans import budget_at
from tests.service.test_health_api import assert_error_shape

CAMPAIGN = {
    "families": ["resnet18"],
    "image_size": 32,
    "kinds": ["network"],
    "network_samples": 2,
    "quick": True,
}


@pytest.fixture(scope="module")
def environment() -> dict[str, Any]:
    return collect_environment({"threads": 1}).model_dump(mode="json")


def queue_campaign(api: Api, device: str = "tiny-cpu", **changes: Any) -> dict[str, Any]:
    response = api.post(f"/v1/devices/{device}/campaigns", json={**CAMPAIGN, **changes})
    assert response.status_code == 202, response.text
    task: dict[str, Any] = response.json()
    return task


def lease(api: Api, agent_id: str, key: str = "agent", **body: Any) -> httpx.Response:
    return api.post("/v1/agent/tasks/lease", key=key, json={"agent_id": agent_id, **body})


def call(
    api: Api, task_id: int, action: str, agent_id: str, key: str = "agent", **body: Any
) -> httpx.Response:
    return api.post(f"/v1/agent/tasks/{task_id}/{action}", key=key, json={"agent_id": agent_id, **body})


def test_a_campaign_is_leased_renewed_completed_once(api: Api, environment: dict[str, Any]) -> None:
    hello = api.post("/v1/agent/hello", key="agent", json={"agent_id": "a1", "environment": environment})
    assert hello.status_code == 200, hello.text
    assert hello.json()["key_scope"] == "agent" and hello.json()["device"]["name"] == "tiny-cpu"
    assert hello.json()["campaign"] is None and hello.json()["has_predictor"] is False
    assert api.get("/v1/devices/tiny-cpu").json()["environment"]["hostname"] == environment["hostname"]

    queued = queue_campaign(api)
    assert queued["status"] == "queued" and queued["payload"]["families"] == ["resnet18"]
    assert queued["payload"]["fit_after"] is False and queued["attempts"] == 0

    first = lease(api, "a1")
    assert first.status_code == 200, first.text
    task = first.json()
    assert (task["id"], task["status"], task["lease_owner"], task["attempts"]) == (
        queued["id"],
        "leased",
        "a1",
        1,
    )
    assert task["resumed"] is False
    again = lease(api, "a1").json()  # a restarted agent gets its own task back
    assert again["id"] == task["id"] and again["resumed"] is True and again["attempts"] == 1
    assert lease(api, "a2").status_code == 204

    beat = call(
        api, task["id"], "heartbeat", "a1", progress={"measured": 1, "percent": 50.0, "eta_seconds": 3}
    )
    assert beat.status_code == 200 and beat.json()["progress"]["measured"] == 1
    status = api.get("/v1/devices/tiny-cpu").json()["status"]
    assert status["phase"] == "profiling" and status["percent"] == 50.0

    result = {"measured": 2, "failed": 0, "skipped": 0, "seconds": 1.5, "rejected_batches": 0}
    done = call(api, task["id"], "complete", "a1", result=result)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded" and done.json()["result"] == result
    assert "Idempotency-Replayed" not in done.headers
    replay = call(api, task["id"], "complete", "a1", result=result)
    assert replay.status_code == 200 and replay.headers["Idempotency-Replayed"] == "true"
    assert replay.json() == {**done.json(), "lease_expired": False}
    other_result = call(api, task["id"], "complete", "a1", result={**result, "measured": 3})
    assert "another result" in str(assert_error_shape(other_result, 409, "task_finished")["message"])
    assert_error_shape(call(api, task["id"], "heartbeat", "a1"), 409, "task_finished")
    assert api.get("/v1/devices/tiny-cpu").json()["status"]["phase"] == "registered"

    listed = api.get("/v1/devices/tiny-cpu/tasks", key="reader").json()["items"]
    assert [t["id"] for t in listed] == [task["id"]] and listed[0]["status"] == "succeeded"
    assert api.get("/v1/devices/tiny-cpu/tasks?status=queued", key="reader").json() == {
        "items": [],
        "next_cursor": None,
    }


@pytest.mark.parametrize("special", ["op_coverage", "generated", "generated_transformer"])
def test_a_campaign_may_ask_for_the_special_families(api: Api, special: str) -> None:
    queued = queue_campaign(api, families=["resnet18", special])
    assert queued["payload"]["families"] == ["resnet18", special]
    misspelt = api.post("/v1/devices/tiny-cpu/campaigns", json={**CAMPAIGN, "families": [f"{special}s"]})
    message = str(assert_error_shape(misspelt, 422, "invalid_input")["message"])
    assert f"{special}s" in message and special in message.replace(f"{special}s", "")


def test_hello_queues_one_first_campaign_when_asked(api: Api, environment: dict[str, Any]) -> None:
    body = {"agent_id": "a1", "environment": environment, "profile_minutes": 5}
    first = api.post("/v1/agent/hello", key="agent", json=body).json()
    assert first["campaign_queued"] is True
    campaign = first["campaign"]
    assert campaign["payload"]["budget_minutes"] == 5 and campaign["payload"]["fit_after"] is True
    second = api.post("/v1/agent/hello", key="agent", json=body).json()
    assert second["campaign_queued"] is False and second["campaign"]["id"] == campaign["id"]
    assert len(api.get("/v1/devices/tiny-cpu/tasks").json()["items"]) == 1


def test_no_first_campaign_for_a_device_with_a_predictor(
    api_with_predictor: Api, environment: dict[str, Any]
) -> None:
    body = {"agent_id": "a1", "environment": environment, "profile_minutes": 5}
    hello = api_with_predictor.post("/v1/agent/hello", key="agent", json=body).json()
    assert hello["has_predictor"] is True and hello["campaign"] is None and hello["campaign_queued"] is False


def test_a_campaign_with_fit_after_queues_a_fit(api: Api, tiny_profile: TinyProfile) -> None:
    result = {"measured": 40}
    task = queue_campaign(api, fit_after=True)
    lease(api, "a1")
    refused = call(api, task["id"], "complete", "a1", result=result).json()
    assert refused["result"]["fit"]["queued"] is False and "measure" in refused["result"]["fit"]["reason"]

    api.store_measurements(api.device_id, tiny_profile.measurements)
    task = queue_campaign(api, fit_after=True)
    lease(api, "a1")
    fitted = call(api, task["id"], "complete", "a1", result=result).json()
    assert fitted["result"]["fit"]["queued"] is True
    job = api.get(f"/v1/jobs/{fitted['result']['fit']['job_id']}").json()
    assert job["kind"] == "fit" and job["status"] == "queued" and job["device_id"] == api.device_id
    assert api.get("/v1/devices/tiny-cpu").json()["status"]["phase"] == "fitting"

    task = queue_campaign(api, fit_after=True)
    lease(api, "a1")
    busy = call(api, task["id"], "complete", "a1", result=result).json()["result"]["fit"]
    assert busy["queued"] is False and busy["job_id"] == job["id"]


def test_lapsed_leases_go_back_to_the_queue_then_fail_for_good(api: Api) -> None:
    task_id = queue_campaign(api)["id"]
    with api.factory() as session:
        session.get(AgentTask, task_id).max_attempts = 2  # type: ignore[union-attr]
        session.commit()
    t0 = utcnow()
    with api.factory() as session:
        device = session.get(Device, api.device_id)
        assert device is not None
        leased = lease_task(session, device, "a1", 5.0, now=t0)
        assert leased is not None and leased[0].id == task_id
        session.commit()
        assert (
            lease_task(session, device, "a2", 5.0, now=t0 + timedelta(seconds=4)) is None
        )  # a1's lease holds
        taken = lease_task(session, device, "a2", 5.0, now=t0 + timedelta(seconds=6))
        assert taken is not None and not taken[1]
        assert (taken[0].lease_owner, taken[0].attempts) == ("a2", 2)
        assert "agent a1 stopped renewing its lease on attempt 1 of 2" in str(taken[0].error)
        session.commit()
        assert lease_task(session, device, "a3", 5.0, now=t0 + timedelta(seconds=12)) is None
        session.commit()
        failed = session.get(AgentTask, task_id, populate_existing=True)
        assert failed is not None and failed.status == TaskStatus.FAILED
        assert "agent a2" in str(failed.error) and "no attempts are left" in str(failed.error)
    shown = api.get("/v1/devices/tiny-cpu").json()["status"]
    assert shown["phase"] == "failed" and f"campaign {task_id} failed" in shown["message"]
    # The agents that lost the task are told so, in the error shape.
    assert_error_shape(call(api, task_id, "heartbeat", "a2"), 409, "task_finished")


def test_a_late_result_counts_unless_another_agent_took_the_task(api: Api) -> None:
    lapsed_then_taken = queue_campaign(api)["id"]
    lapsed_then_queued = queue_campaign(api)["id"]
    with api.factory() as session:
        device = session.get(Device, api.device_id)
        assert device is not None
        long_ago = utcnow() - timedelta(minutes=1)
        lease_task(session, device, "a1", 5.0, now=long_ago)
        lease_task(session, device, "b1", 5.0, now=long_ago)
        session.commit()
        reclaim_lapsed(session, api.device_id)  # both back in the queue, nobody holds them
        session.commit()
    assert lease(api, "a2").json()["id"] == lapsed_then_taken
    stolen = call(api, lapsed_then_taken, "complete", "a1", result={"measured": 1})
    assert "leased by agent a2" in str(assert_error_shape(stolen, 409, "lease_lost")["message"])
    assert call(api, lapsed_then_taken, "complete", "a2", result={"measured": 1}).status_code == 200
    late = call(api, lapsed_then_queued, "complete", "b1", result={"measured": 2})
    assert late.status_code == 200 and late.json()["status"] == "succeeded"
    assert late.json()["lease_owner"] == "b1"


def test_failing_requeues_while_attempts_are_left(api: Api) -> None:
    task_id = queue_campaign(api)["id"]
    lease(api, "a1")
    retried = call(api, task_id, "fail", "a1", error="camera busy", retry=True).json()
    assert (
        retried["status"] == "queued" and retried["error"] == "camera busy" and retried["lease_owner"] is None
    )
    assert lease(api, "a2").json()["attempts"] == 2
    final = call(api, task_id, "fail", "a2", error="out of memory").json()
    assert final["status"] == "failed" and final["finished_at"] is not None
    assert_error_shape(call(api, task_id, "fail", "a2", error="again"), 409, "task_finished")


def test_bad_agent_requests_get_clear_errors(api: Api, environment: dict[str, Any]) -> None:
    other_id, other_key = api.add_device("other-cpu", local=False)
    task_id = queue_campaign(api)["id"]
    lease(api, "a1")

    unknown = call(api, 987654, "complete", "a1", result={"measured": 1})
    assert "no agent task with id 987654" in str(assert_error_shape(unknown, 404, "not_found")["message"])
    someone_elses = call(api, task_id, "complete", "intruder", result={"measured": 1})
    assert "leased by agent a1, not intruder" in str(
        assert_error_shape(someone_elses, 409, "lease_lost")["message"]
    )
    wrong_device = call(api, task_id, "heartbeat", "a1", key=other_key)
    assert "agent key of another device" in str(
        assert_error_shape(wrong_device, 403, "permission_denied")["message"]
    )
    assert_error_shape(lease(api, "a1", key=other_key, device="tiny-cpu"), 403, "permission_denied")
    assert lease(api, "b1", key=other_key).status_code == 204  # its own device has nothing queued
    assert_error_shape(lease(api, "a1", key="reader"), 403, "permission_denied")
    no_device = api.post("/v1/agent/hello", json={"agent_id": "adm", "environment": environment})
    assert "name the device" in str(assert_error_shape(no_device, 422, "invalid_input")["message"])
    assert_error_shape(lease(api, "adm", key="admin", device="nope"), 404, "not_found")
    assert_error_shape(lease(api, "bad id!"), 422, "validation_error")
    bad_result = call(api, task_id, "complete", "a1", result={"measured": -1})
    assert "measured" in str(assert_error_shape(bad_result, 422, "invalid_input")["message"])
    unknown_family = api.post(
        "/v1/devices/tiny-cpu/campaigns", json={**CAMPAIGN, "families": ["resnet_nope"]}
    )
    assert "resnet_nope" in str(assert_error_shape(unknown_family, 422, "invalid_input")["message"])
    assert_error_shape(api.post("/v1/devices/nope/campaigns", json=CAMPAIGN), 404, "not_found")
    assert_error_shape(
        api.post("/v1/devices/tiny-cpu/campaigns", json=CAMPAIGN, key="agent"), 403, "permission_denied"
    )
    # Nothing above changed the task.
    assert lease(api, "a1").json()["status"] == "leased"
    assert other_id != api.device_id


def test_verify_results_must_match_the_network(api: Api) -> None:
    network = tiny_network()
    with api.factory() as session:
        task = AgentTask(
            device_id=api.device_id,
            kind="verify",
            payload={"architecture": network.model_dump(mode="json"), "network_hash": network.content_hash},
        )
        session.add(task)
        session.commit()
        task_id = task.id
    assert lease(api, "a1").json()["kind"] == "verify"
    missing = call(api, task_id, "complete", "a1", result={"network_hash": network.content_hash})
    assert "measured_ms" in str(assert_error_shape(missing, 422, "invalid_input")["message"])
    wrong = call(api, task_id, "complete", "a1", result={"measured_ms": 1.0, "network_hash": "0" * 64})
    assert "asked to measure" in str(assert_error_shape(wrong, 422, "invalid_input")["message"])
    ok = call(
        api, task_id, "complete", "a1", result={"measured_ms": 1.25, "network_hash": network.content_hash}
    )
    assert ok.json()["result"]["measured_ms"] == 1.25


def test_a_verify_plan_without_an_agent_fails_after_the_timeout(
    api_with_predictor: Api, tiny_profile: TinyProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LPNET_AGENT__VERIFY_TIMEOUT_SECONDS", "0.5")
    get_settings.cache_clear()
    api = api_with_predictor
    device_id, _ = api.add_device("remote-cpu", local=False)
    api.store_predictor(device_id, tiny_profile.fitted)
    request = {
        "device": "remote-cpu",
        "architecture": tiny_profile.network.model_dump(mode="json"),
        "budget_ms": budget_at(tiny_profile, 0.6),
        "options": {"verify": True},
    }
    plan_id = api.post("/v1/plans", key="reader", json=request).json()["job_id"]
    worker = Worker(api.factory, default_registry())
    # The first run asks for the verify task and leaves the plan waiting, without holding the worker;
    # the plan is looked at again no later than the verify timeout, and fails then.
    worker.run_once()
    plan = api.get(f"/v1/plans/{plan_id}", key="reader").json()
    assert plan["status"] == "running" and plan["progress"]["phase"] == "waiting_for_agent"
    deadline = time.monotonic() + 30
    while plan["status"] == "running" and time.monotonic() < deadline:
        if worker.run_once() is None:
            time.sleep(0.1)
        plan = api.get(f"/v1/plans/{plan_id}", key="reader").json()
    assert plan["status"] == "failed"
    assert "no agent of device 'remote-cpu' measured the pruned network within 0.5 s" in plan["error"]
    assert "lpnet agent" in plan["error"]
    tasks = api.get("/v1/devices/remote-cpu/tasks").json()["items"]
    assert len(tasks) == 1 and tasks[0]["kind"] == "verify" and tasks[0]["status"] == "cancelled"
    assert tasks[0]["job_id"] == plan_id


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_leases_never_hand_one_task_to_two_agents(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url: str = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    upgrade(url)
    tasks, agents = 24, 8
    with api_client(url) as api:
        for _ in range(tasks):
            queue_campaign(api)
        app = create_app(
            Settings(database_url=url, worker=WorkerSettings(embedded=False), agent=AgentSettings())
        )
        leased: list[tuple[int, str]] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(agents)

        def agent(index: int) -> None:
            headers = {"Authorization": f"Bearer {api.keys.agent}"}
            with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
                start.wait()
                for attempt in range(tasks):
                    agent_id = f"agent-{index}-{attempt}"  # a fresh agent each call: no resumes
                    response = client.post("/v1/agent/tasks/lease", json={"agent_id": agent_id})
                    if response.status_code == 204:
                        return
                    with lock:
                        if response.status_code != 200:
                            errors.append(response.text)
                            return
                        leased.append((response.json()["id"], agent_id))

        with serve_in_thread(app) as base:
            threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        assert errors == []
        ids = [task_id for task_id, _ in leased]
        assert len(ids) == tasks and len(set(ids)) == tasks
        with api.factory() as session:
            rows = list(session.scalars(select(AgentTask)))
        assert all(row.status == TaskStatus.LEASED and row.attempts == 1 for row in rows)
        assert {row.id: row.lease_owner for row in rows} == dict(leased)


def test_admin_keys_act_for_a_named_device(api: Api, environment: dict[str, Any]) -> None:
    task_id = queue_campaign(api)["id"]
    body = {"agent_id": "adm", "device": "tiny-cpu", "environment": environment}
    assert api.post("/v1/agent/hello", json=body).json()["key_scope"] == "admin"
    assert lease(api, "adm", key="admin", device=str(api.device_id)).json()["id"] == task_id
    keys = api.get("/v1/agent/sample-keys", params={"device": "tiny-cpu"}).json()
    assert keys == {"device_id": api.device_id, "sample_keys": []}
    with api.factory() as session:
        reader = create_api_key(session, scope=KeyScope.READER.value)[1]
        session.commit()
    assert_error_shape(api.get("/v1/agent/sample-keys", key=reader), 403, "permission_denied")


def test_a_device_name_holding_a_nul_is_refused_before_any_lookup(
    api: Api, environment: dict[str, Any]
) -> None:
    # PostgreSQL cannot compare text holding a NUL; such a name must be a 422, never a 500.
    body = {"agent_id": "adm", "device": "tiny\x00cpu", "environment": environment}
    response = api.post("/v1/agent/hello", json=body)
    assert_error_shape(response, 422, "validation_error")
    assert "NUL" in response.text
    latency = api.post(
        "/v1/latency", json={"device": "tiny\x00cpu", "architecture": {"torchvision": "resnet18"}}
    )
    assert_error_shape(latency, 422, "validation_error")
