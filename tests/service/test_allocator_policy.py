"""A device's allocator policy: registered and shown, stated by every latency answer and plan, and
measurements taken under another policy refused with nothing stored lost."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lpnet.arch.groups import channel_layout
from lpnet.client.answers import Allocator, BatchLatency, Device, Latency, Plan
from profiler.environment import ALLOCATOR_ENVIRONMENT, AllocatorPolicy
from service.cli import main
from service.db.models import Device as DeviceRow
from service.db.models import NetworkMeasurement, ProfileBatch, ProfileRun
from service.job_handlers import default_registry
from service.jobs.worker import Worker
from service.profiles import AllocatorMismatch
from service.profiling import DatabaseSink
from service.testing.tiny import TINY_SPEC, TinyProfile
from tests.service.support import Api, feasible_budget, tiny_device
from tests.service.test_health_api import assert_error_shape

RETAIN_ENVIRONMENT = dict(ALLOCATOR_ENVIRONMENT[AllocatorPolicy.RETAIN])
RETAIN = {"policy": "retain", "environment": RETAIN_ENVIRONMENT}
SYSTEM = {"policy": "system", "environment": {}}


def register(api: Api, name: str, **fields: Any) -> dict[str, Any]:
    response = api.post("/v1/devices", json={"name": name, **TINY_SPEC.to_dict(), **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def with_system_twin(api: Api, profile: TinyProfile) -> None:
    """Register `tiny-system`: the tiny measurements and predictor, on a device stating system."""
    device = register(api, "tiny-system", allocator="system", is_local=True)
    api.store_measurements(device["id"], profile.measurements)
    api.store_predictor(device["id"], profile.fitted)


def stored_counts(api: Api) -> dict[str, int]:
    with api.factory() as session:
        return {
            table.__tablename__: int(session.scalar(select(func.count()).select_from(table)) or 0)
            for table in (NetworkMeasurement, ProfileBatch, ProfileRun)
        }


def test_a_device_registered_with_system_stores_and_shows_it(api: Api) -> None:
    created = register(api, "edge-system", allocator="system", is_local=False)
    assert created["allocator"] == "system"
    assert api.get(f"/v1/devices/{created['id']}", key="reader").json()["allocator"] == "system"
    with api.factory() as session:
        row = session.get(DeviceRow, created["id"])
        assert row is not None and row.allocator == "system"
    assert register(api, "edge-default", is_local=False)["allocator"] == "retain"
    listed = [
        Device.model_validate(device) for device in api.get("/v1/devices", key="reader").json()["items"]
    ]
    assert {device.name: device.allocator for device in listed} == {
        "edge-default": "retain",
        "edge-system": "system",
        "tiny-cpu": "retain",
    }


def test_an_unknown_allocator_is_422_naming_the_field(api: Api) -> None:
    response = api.post("/v1/devices", json={"name": "edge", "hardware": "cpu", "allocator": "jemalloc"})
    error = assert_error_shape(response, 422, "validation_error")
    assert "body.allocator" in str(error["message"]) and "'retain' or 'system'" in str(error["message"])
    with api.factory() as session:
        assert session.scalar(select(DeviceRow.id).where(DeviceRow.name == "edge")) is None


def test_the_database_refuses_an_allocator_the_code_does_not_know(session: Session) -> None:
    device = tiny_device("edge")
    device.allocator = "jemalloc"
    session.add(device)
    with pytest.raises(IntegrityError, match="ck_device_allocator_valid"):
        session.commit()


def test_latency_answers_state_the_devices_policy(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    api = api_with_predictor
    with_system_twin(api, tiny_profile)
    architecture = tiny_profile.network.model_dump(mode="json")
    full = channel_layout(tiny_profile.network).full_widths
    for device, expected in (("tiny-cpu", RETAIN), ("tiny-system", SYSTEM)):
        single = api.post("/v1/latency", key="reader", json={"device": device, "architecture": architecture})
        assert single.status_code == 200, single.text
        assert single.json()["allocator"] == expected
        assert Latency.model_validate(single.json()).allocator == Allocator.model_validate(expected)
        widths = {"device": device, "architecture": architecture, "widths": [full]}
        batch = api.post("/v1/latency/batch", key="reader", json=widths)
        assert batch.status_code == 200, batch.text
        assert BatchLatency.model_validate(batch.json()).allocator == Allocator.model_validate(expected)


def test_plans_state_the_devices_policy(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    api = api_with_predictor
    with_system_twin(api, tiny_profile)
    budget = feasible_budget(tiny_profile.fitted.artifact, tiny_profile.network, 0.5)
    architecture = tiny_profile.network.model_dump(mode="json")
    for device, expected in (("tiny-cpu", RETAIN), ("tiny-system", SYSTEM)):
        request = {"device": device, "architecture": architecture, "budget_ms": budget}
        accepted = api.post("/v1/plans", key="reader", json=request)
        assert accepted.status_code == 202, accepted.text
        url = f"/v1/plans/{accepted.json()['job_id']}"
        assert api.get(url, key="reader").json()["allocator"] == expected  # from the start
        Worker(api.factory, default_registry()).run_once()
        plan = Plan.model_validate(api.get(url, key="reader").json())
        assert plan.status == "succeeded", plan.error
        assert plan.allocator == Allocator.model_validate(expected)


def test_measurements_under_another_policy_are_refused_and_nothing_stored_is_lost(
    api: Api, tiny_profile: TinyProfile
) -> None:
    url = f"/v1/devices/{api.device_id}/profiles"
    first = tiny_profile.batch_json("alloc-retain-0001", tiny_profile.network_measurements[:2])
    assert first["environment"]["allocator_retains_memory"] is True  # the tiny profile ran under retain
    assert api.post(url, key="agent", json=first).status_code == 201
    before = stored_counts(api)

    other = tiny_profile.batch_json("alloc-other-0001", tiny_profile.network_measurements[2:4])
    other["environment"]["allocator_retains_memory"] = False
    error = assert_error_shape(api.post(url, key="agent", json=other), 422, "allocator_mismatch")
    message = str(error["message"])
    assert "registered with allocator policy 'retain'" in message and "ran under 'system'" in message
    recipe = " ".join(f"{name}={value}" for name, value in RETAIN_ENVIRONMENT.items())
    assert recipe in message and "nothing was stored" in message
    assert error["details"] == {"allocator": {"registered": "retain", "measured": "system"}}
    assert stored_counts(api) == before

    # The stored batch still replays; the refused key was not taken, so the rows measured under the
    # device's policy go in under it.
    replay = api.post(url, key="agent", json=first)
    assert replay.status_code == 201 and replay.headers["Idempotency-Replayed"] == "true"
    again = tiny_profile.batch_json("alloc-other-0001", tiny_profile.network_measurements[2:4])
    assert api.post(url, key="agent", json=again).json()["stored"]["network"] == 2


def test_a_system_device_takes_only_measurements_under_system(api: Api, tiny_profile: TinyProfile) -> None:
    device = register(api, "edge-system", allocator="system", is_local=False)
    url = f"/v1/devices/{device['id']}/profiles"
    retained = tiny_profile.batch_json("alloc-sys-0001", tiny_profile.network_measurements[:2])
    response = api.post(url, key=device["agent_key"], json=retained)
    error = assert_error_shape(response, 422, "allocator_mismatch")
    assert error["details"] == {"allocator": {"registered": "system", "measured": "retain"}}
    assert "--allocator system in a fresh process started without MALLOC_MMAP_THRESHOLD_" in str(
        error["message"]
    )
    retained["environment"]["allocator_retains_memory"] = False
    accepted = api.post(url, key=device["agent_key"], json=retained)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["stored"]["network"] == 2


def test_a_local_run_under_another_policy_stores_nothing(api: Api, tiny_profile: TinyProfile) -> None:
    created = register(api, "local-system", allocator="system", is_local=True)
    before = stored_counts(api)
    with api.factory() as session:
        device = session.get(DeviceRow, created["id"])
    assert device is not None
    with pytest.raises(
        AllocatorMismatch, match="registered with allocator policy 'system'.*ran under 'retain'"
    ):
        DatabaseSink(api.factory, device, tiny_profile.context)
    assert stored_counts(api) == before


def test_the_agent_hears_its_devices_policy(api: Api, tiny_profile: TinyProfile) -> None:
    device = register(api, "edge-system", allocator="system", is_local=False)
    environment = tiny_profile.context.environment.model_dump(mode="json")
    hello = api.post(
        "/v1/agent/hello", key=device["agent_key"], json={"agent_id": "a1", "environment": environment}
    )
    assert hello.status_code == 200, hello.text
    assert hello.json()["device"]["allocator"] == "system"


def test_lpnet_device_add_and_list_show_the_policy(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_url)
    added = ["device", "add", "pi", "--remote", "--hardware", "RPi 4", "--allocator", "system"]
    assert main(added) == 0
    assert "allocator system, remote" in capsys.readouterr().out
    assert main(["device", "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[6] == "ALLOCATOR" and row.split()[6] == "system"
    assert main(["profile", "--device", "pi", "--allocator", "system"]) == 2
    assert "--allocator is only used with --submit" in capsys.readouterr().err
