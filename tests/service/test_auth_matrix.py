"""Every endpoint with every kind of key: missing/invalid/revoked 401, wrong scope or device 403, else 2xx."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from safetensors.torch import save

from lpnet.arch.groups import channel_layout
from lpnet.arch.onnx_io import export_onnx
from profiler.environment import collect_environment
from service.auth import create_api_key, revoke_api_key
from service.db.base import utcnow
from service.db.migrate import upgrade
from service.db.models import AgentTask, KeyScope, TaskKind, TaskStatus
from service.job_handlers import default_registry
from service.jobs.worker import Worker
from service.main import ROUTERS
from service.testing.tiny import TINY_INPUT_SHAPE, TinyProfile, tiny_module
from tests.conftest import fresh_postgres_database
from tests.service.support import Api, api_client

SCOPES = ("none", "invalid", "revoked", "reader", "agent", "other_agent", "admin")
_counter = itertools.count()


@dataclass
class Matrix:
    api: Api
    profile: TinyProfile
    keys: dict[str, str | None]
    ids: dict[str, Any]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def matrix(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_profile: TinyProfile
) -> Iterator[Matrix]:
    """One database per backend for the whole matrix, with a predictor, a plan, a model and keys."""
    if request.param == "sqlite":
        url = f"sqlite:///{(tmp_path_factory.mktemp('matrix') / 'matrix.db').as_posix()}"
        yield from _matrix(url, tiny_profile)
    else:
        with fresh_postgres_database() as url:
            yield from _matrix(url, tiny_profile)


def _matrix(url: str, profile: TinyProfile) -> Iterator[Matrix]:
    upgrade(url)
    with api_client(url) as api:
        api.store_measurements(api.device_id, profile.measurements)
        predictor_id = api.store_predictor(api.device_id, profile.fitted)
        other_id, other_agent = api.add_device("other-cpu")
        with api.factory() as session:
            revoked_key = create_api_key(session, scope=KeyScope.ADMIN.value)
            revoke_api_key(session, revoked_key[0].prefix)
            session.commit()
        weights = save({k: v.contiguous() for k, v in tiny_module().state_dict().items()})
        model_id = api.post(
            "/v1/models", files={"file": ("w.safetensors", weights)}, data={"name": "tiny"}
        ).json()["id"]
        plan = api.post("/v1/plans", key="reader", json=_plan_body(profile)).json()
        weights_body = _plan_body(profile) | {"options": {"mode": "weights", "model_id": model_id}}
        weights_plan = api.post("/v1/plans", key="reader", json=weights_body).json()
        worker = Worker(api.factory, default_registry())
        while worker.run_once() is not None:
            pass
        keys: dict[str, str | None] = {
            "none": None,
            "invalid": "lpn_" + "x" * 43,
            "revoked": revoked_key[1],
            "reader": api.keys.reader,
            "agent": api.keys.agent,
            "other_agent": other_agent,
            "admin": api.keys.admin,
        }
        latency_plot = api.post(
            "/v1/latency",
            key="reader",
            json={
                "device": "tiny-cpu",
                "architecture": profile.network.model_dump(mode="json"),
                "plot": True,
            },
        ).json()["plot_url"]
        ids = {
            "latency_plot": latency_plot,
            "device": api.device_id,
            "other_device": other_id,
            "predictor": predictor_id,
            "model": model_id,
            "plan": plan["job_id"],
            "weights_plan": weights_plan["job_id"],
            "onnx": export_onnx(tiny_module().eval(), TINY_INPUT_SHAPE),
            "full_widths": channel_layout(profile.network).full_widths,
            "environment": collect_environment().model_dump(mode="json"),
        }
        yield Matrix(api, profile, keys, ids)


def _plan_body(profile: TinyProfile) -> dict[str, Any]:
    return {"device": "tiny-cpu", "architecture": profile.network.model_dump(mode="json"), "budget_ms": 100.0}


Request = Callable[[Matrix], tuple[str, str, dict[str, Any]]]


def _throwaway_key(m: Matrix) -> str:
    with m.api.factory() as session:
        row, _ = create_api_key(session, scope=KeyScope.READER.value, name="throwaway")
        session.commit()
        return row.prefix


def _agent_id() -> str:
    return f"matrix-agent-{next(_counter)}"


def _leased_task(m: Matrix) -> tuple[int, str]:
    """A profile campaign of the matrix device, leased by a fresh agent id."""
    agent_id = _agent_id()
    with m.api.factory() as session:
        task = AgentTask(
            device_id=m.ids["device"],
            kind=TaskKind.PROFILE_CAMPAIGN,
            status=TaskStatus.LEASED,
            payload={"families": ["resnet18"]},
            lease_owner=agent_id,
            lease_expires_at=utcnow() + timedelta(minutes=5),
            attempts=1,
        )
        session.add(task)
        session.commit()
        return task.id, agent_id


def _task_call(m: Matrix, action: str, body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    task_id, agent_id = _leased_task(m)
    return "POST", f"/v1/agent/tasks/{task_id}/{action}", {"json": {"agent_id": agent_id, **body}}


def _batch(m: Matrix) -> dict[str, Any]:
    return m.profile.batch_json(f"matrix-batch-{next(_counter):04d}", m.profile.network_measurements[:1])


ENDPOINTS: dict[str, tuple[Request, set[str]]] = {
    "create device": (
        lambda _m: ("POST", "/v1/devices", {"json": {"name": f"dev-{next(_counter)}", "hardware": "cpu"}}),
        {"admin"},
    ),
    "list devices": (lambda _m: ("GET", "/v1/devices", {}), {"reader", "admin"}),
    "show device": (lambda m: ("GET", f"/v1/devices/{m.ids['device']}", {}), {"reader", "admin"}),
    "fit predictor": (lambda m: ("POST", f"/v1/devices/{m.ids['device']}/predictors", {}), {"admin"}),
    "list predictors": (
        lambda m: ("GET", f"/v1/devices/{m.ids['device']}/predictors", {}),
        {"reader", "admin"},
    ),
    "submit profiles": (
        lambda m: ("POST", f"/v1/devices/{m.ids['device']}/profiles", {"json": _batch(m)}),
        {"agent", "admin"},
    ),
    "latency": (
        lambda m: (
            "POST",
            "/v1/latency",
            {"json": {"device": "tiny-cpu", "architecture": m.profile.network.model_dump(mode="json")}},
        ),
        {"reader", "admin"},
    ),
    "latency batch": (
        lambda m: (
            "POST",
            "/v1/latency/batch",
            {
                "json": {
                    "device": "tiny-cpu",
                    "architecture": m.profile.network.model_dump(mode="json"),
                    "widths": [m.ids["full_widths"]],
                }
            },
        ),
        {"reader", "admin"},
    ),
    "latency onnx": (
        lambda m: (
            "POST",
            "/v1/latency/onnx",
            {"files": {"file": ("t.onnx", m.ids["onnx"])}, "data": {"device": "tiny-cpu"}},
        ),
        {"reader", "admin"},
    ),
    "show predictor": (lambda m: ("GET", f"/v1/predictors/{m.ids['predictor']}", {}), {"reader", "admin"}),
    "predictor plot": (
        lambda m: ("GET", f"/v1/predictors/{m.ids['predictor']}/plot.png", {}),
        {"reader", "admin"},
    ),
    "predictor artifact": (
        lambda m: ("GET", f"/v1/predictors/{m.ids['predictor']}/artifact", {}),
        {"reader", "admin"},
    ),
    "import predictor": (
        lambda m: (
            "POST",
            f"/v1/devices/{m.ids['device']}/predictors/import",
            {
                "content": m.profile.fitted.artifact,
                "headers": {"Content-Type": "application/octet-stream"},
            },
        ),
        {"agent", "admin"},
    ),
    "request plan": (lambda m: ("POST", "/v1/plans", {"json": _plan_body(m.profile)}), {"reader", "admin"}),
    "list plans": (lambda _m: ("GET", "/v1/plans", {}), {"reader", "admin"}),
    "show plan": (lambda m: ("GET", f"/v1/plans/{m.ids['plan']}", {}), {"reader", "admin"}),
    "plan layers chart": (
        lambda m: ("GET", f"/v1/plans/{m.ids['plan']}/layers.png", {}),
        {"reader", "admin"},
    ),
    "latency plot": (lambda m: ("GET", m.ids["latency_plot"], {}), {"reader", "admin"}),
    "plan model": (
        lambda m: ("GET", f"/v1/plans/{m.ids['weights_plan']}/model", {}),
        {"reader", "admin"},
    ),
    "list jobs": (lambda _m: ("GET", "/v1/jobs", {}), {"reader", "admin"}),
    "show job": (lambda m: ("GET", f"/v1/jobs/{m.ids['plan']}", {}), {"reader", "admin"}),
    "upload model": (
        lambda _m: (
            "POST",
            "/v1/models",
            {
                "files": {
                    "file": ("b.safetensors", save({"b": tiny_module().fc.bias.detach().contiguous()}))
                },
                "data": {"name": "b"},
            },
        ),
        {"admin"},
    ),
    "show model": (lambda m: ("GET", f"/v1/models/{m.ids['model']}", {}), {"reader", "admin"}),
    "create key": (lambda _m: ("POST", "/v1/keys", {"json": {"scope": "reader"}}), {"admin"}),
    "list keys": (lambda _m: ("GET", "/v1/keys", {}), {"admin"}),
    "revoke key": (lambda m: ("DELETE", f"/v1/keys/{_throwaway_key(m)}", {}), {"admin"}),
    "queue campaign": (
        lambda m: (
            "POST",
            f"/v1/devices/{m.ids['device']}/campaigns",
            {"json": {"families": ["resnet18"], "image_size": 32, "network_samples": 1}},
        ),
        {"admin"},
    ),
    "list tasks": (lambda m: ("GET", f"/v1/devices/{m.ids['device']}/tasks", {}), {"reader", "admin"}),
    # Agent routes: the matrix device's agent key, or an admin key naming that device; another
    # device's agent key is refused.
    "agent hello": (
        lambda m: (
            "POST",
            "/v1/agent/hello",
            {"json": {"agent_id": _agent_id(), "device": "tiny-cpu", "environment": m.ids["environment"]}},
        ),
        {"agent", "admin"},
    ),
    "lease task": (
        lambda _m: (
            "POST",
            "/v1/agent/tasks/lease",
            {"json": {"agent_id": _agent_id(), "device": "tiny-cpu"}},
        ),
        {"agent", "admin"},
    ),
    "task heartbeat": (
        lambda m: _task_call(m, "heartbeat", {"progress": {"measured": 1}}),
        {"agent", "admin"},
    ),
    "complete task": (lambda m: _task_call(m, "complete", {"result": {"measured": 1}}), {"agent", "admin"}),
    "fail task": (lambda m: _task_call(m, "fail", {"error": "no camera"}), {"agent", "admin"}),
    "sample keys": (
        lambda _m: ("GET", "/v1/agent/sample-keys", {"params": {"device": "tiny-cpu"}}),
        {"agent", "admin"},
    ),
}
OPEN_PATHS = ("/healthz", "/readyz", "/openapi.json", "/docs")


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_auth_matrix(matrix: Matrix, endpoint: str, scope: str) -> None:
    build, allowed = ENDPOINTS[endpoint]
    method, path, kwargs = build(matrix)
    key = matrix.keys[scope]
    headers = ({"Authorization": f"Bearer {key}"} if key else {}) | kwargs.pop("headers", {})
    response = matrix.api.client.request(method, path, headers=headers, **kwargs)
    if scope in ("none", "invalid", "revoked"):
        expected = 401
    elif scope in allowed:
        expected = response.status_code if 200 <= response.status_code < 300 else -1
    else:
        expected = 403
    assert response.status_code == expected, (
        f"{method} {path} as {scope}: {response.status_code} {response.text[:300]}"
    )
    if expected == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_every_v1_route_is_in_the_matrix(matrix: Matrix) -> None:
    # The routers themselves: the app's route list groups included routers without their paths.
    routes = {
        (method, route.path)  # type: ignore[attr-defined]
        for router in ROUTERS
        for route in router.routes
        if getattr(route, "path", "").startswith("/v1")
        for method in route.methods  # type: ignore[attr-defined]
    }
    assert routes, "no /v1 route found"
    covered = set()
    for build, _ in ENDPOINTS.values():
        method, path, _kwargs = build(matrix)
        for route_method, template in routes:
            pattern = (
                "^"
                + "/".join("[^/]+" if part.startswith("{") else part for part in template.split("/"))
                + "$"
            )
            if route_method == method and re.match(pattern, path):
                covered.add((route_method, template))
    assert covered == routes


@pytest.mark.parametrize("path", OPEN_PATHS)
def test_probes_and_docs_need_no_key(matrix: Matrix, path: str) -> None:
    assert matrix.api.client.get(path).status_code == 200


def test_metrics_need_an_admin_key(matrix: Matrix) -> None:
    assert matrix.api.client.get("/metrics").status_code == 401
    for scope in ("reader", "agent"):
        headers = {"Authorization": f"Bearer {matrix.keys[scope]}"}
        assert matrix.api.client.get("/metrics", headers=headers).status_code == 403
    headers = {"Authorization": f"Bearer {matrix.keys['admin']}"}
    assert matrix.api.client.get("/metrics", headers=headers).status_code == 200


def test_keys_may_also_come_in_x_api_key(matrix: Matrix) -> None:
    response = matrix.api.client.get("/v1/devices", headers={"X-API-Key": str(matrix.keys["reader"])})
    assert response.status_code == 200
