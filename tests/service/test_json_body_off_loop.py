"""Large JSON bodies are parsed and validated in the thread pool, over real HTTP.

While another client posts architectures of thousands of layers to a served process, /healthz keeps
answering, as it does not while the same bodies go to a route whose body FastAPI parses on the loop;
invalid bodies get the same 422 as any request validation error; the OpenAPI document still describes the
bodies with resolvable references.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lpnet.arch.ir import MAX_LAYERS
from service.config import Settings, WorkerSettings
from service.main import create_app
from service.testing.processes import Processes, ServedApi, running_api
from tests.service.support import Api, api_client
from tests.service.test_health_api import LiveServer, assert_error_shape

JSON = {"Content-Type": "application/json"}
# Oversized bodies posted while /healthz is polled, in each phase.
OVERSIZED_POSTS = 9
# A body parsed on the loop holds a poll for about the whole parse. In the thread pool the parse still
# holds the interpreter lock, but the collector pauses and the loop runs between the parse and the
# validation: a poll waits well under this share of the on-loop stall.
STALL_SHARE = 0.5


@dataclass
class Live:
    """A real server on loopback and the `Api` harness (keys, device "tiny-cpu" without a predictor)."""

    api: Api
    base_url: str

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.api.headers(self.api.keys.reader), **kwargs.pop("headers", {})}
        return httpx.post(f"{self.base_url}{path}", headers=headers, timeout=60, **kwargs)


@pytest.fixture
def live(sqlite_migrated_url: str, live_server: LiveServer) -> Iterator[Live]:
    with api_client(sqlite_migrated_url) as api:
        app = create_app(Settings(database_url=sqlite_migrated_url, worker=WorkerSettings(embedded=False)))
        with live_server(app) as base_url:
            yield Live(api, base_url)


def relu_chain(length: int) -> dict[str, Any]:
    """A 3x3 conv followed by relus, `length` layers in all."""
    layers: list[dict[str, Any]] = [
        {
            "name": "conv0",
            "op": "conv2d",
            "inputs": ["input"],
            "in_channels": 3,
            "out_channels": 8,
            "in_hw": [32, 32],
            "out_hw": [32, 32],
            "kernel": [3, 3],
            "padding": [1, 1],
        }
    ]
    for i in range(1, length):
        layers.append(
            {
                "name": f"relu{i}",
                "op": "relu",
                "inputs": [layers[-1]["name"]],
                "in_channels": 8,
                "out_channels": 8,
                "in_hw": [32, 32],
                "out_hw": [32, 32],
            }
        )
    return {"input_shape": [1, 3, 32, 32], "layers": layers, "outputs": [layers[-1]["name"]]}


def test_healthz_answers_while_large_bodies_are_parsed(sqlite_migrated_url: str, tmp_path: Path) -> None:
    # A served process of its own: a parse holds its interpreter lock, which the polls here must not share.
    with (
        Processes(tmp_path / "logs") as processes,
        running_api(processes, sqlite_migrated_url, tmp_path / "data") as served,
    ):
        valid = {"device": "no-such-device", "architecture": relu_chain(4000)}
        oversized = {"device": "no-such-device", "architecture": relu_chain(10 * MAX_LAYERS)}
        bodies = [json.dumps(oversized).encode(), json.dumps(valid).encode()]
        with served.client() as client:
            # The valid network passes validation and stops at the unknown device.
            assert client.post("/v1/latency", content=bodies[1], headers=JSON).status_code == 404
            assert client.post("/v1/latency", content=bodies[0], headers=JSON).status_code in (413, 422)
        # The control, under the same load: device registration takes its body as FastAPI does, parsed
        # on the loop, and refuses this one (422) once parsed.
        control_statuses, control = _poll_while_posting(served, "/v1/devices", [bodies[0]])
        statuses, durations = _poll_while_posting(served, "/v1/latency", bodies)
    assert set(control_statuses) == {422}
    assert set(statuses) <= {404, 413, 422}
    # The longest poll of each control post is the loop held by that post's parse.
    stalls = sorted(control, reverse=True)[: len(control_statuses)]
    bound = STALL_SHARE * statistics.median(stalls)
    slow = [round(duration * 1000) for duration in durations if duration >= bound]
    oversized_posts = len(statuses) // 2
    # The scheduler of a loaded machine can delay a poll too: fewer than a third of the posts may.
    assert len(slow) < oversized_posts / 3, (
        f"/healthz took {slow} ms while {oversized_posts} oversized bodies were posted "
        f"(bound {bound * 1000:.0f} ms, half the median stall of a body parsed on the loop)"
    )


def _poll_while_posting(served: ServedApi, path: str, bodies: list[bytes]) -> tuple[list[int], list[float]]:
    """Post `bodies` in turn to `path` from a thread while /healthz is polled; the posts' statuses and
    the polls' durations, once `OVERSIZED_POSTS` rounds were answered and 4 s passed."""
    stop = threading.Event()
    statuses: list[int] = []

    def post_repeatedly() -> None:
        with served.client(timeout=60) as client:
            while not stop.is_set():
                for body in bodies:
                    statuses.append(client.post(path, content=body, headers=JSON).status_code)

    poster = threading.Thread(target=post_repeatedly, daemon=True)
    durations: list[float] = []
    try:
        with httpx.Client(base_url=served.base_url, timeout=30) as client:
            poster.start()
            started = time.monotonic()
            while time.monotonic() < started + 4.0 or len(statuses) < len(bodies) * OVERSIZED_POSTS:
                assert time.monotonic() < started + 60.0, f"only {len(statuses)} posts were answered"
                start = time.monotonic()
                assert client.get("/healthz").status_code == 200
                durations.append(time.monotonic() - start)
                time.sleep(0.01)
    finally:
        stop.set()
        poster.join(60)
    return statuses, durations


@pytest.mark.parametrize("path", ["/v1/latency", "/v1/latency/batch", "/v1/plans"])
def test_invalid_bodies_are_422_naming_the_field(live: Live, path: str) -> None:
    body: dict[str, Any] = {
        "device": live.api.device_name,
        "architecture": {"torchvision": "resnet18"},
        "budget_ms": "fast",
        "widths": [["wide"]],
    }
    response = live.post(path, json=body)
    assert_error_shape(response, 422, "validation_error")
    fields = {error["field"]: error["type"] for error in response.json()["error"]["details"]["errors"]}
    if path == "/v1/latency/batch":
        assert fields["body.widths.0.0"] == "int_parsing"
    elif path == "/v1/plans":
        assert fields["body.budget_ms"] == "float_parsing"
    else:
        assert fields["body.widths"] == "extra_forbidden"

    broken = live.post(path, content=b'{"device": ', headers={"content-type": "application/json"})
    assert_error_shape(broken, 422, "validation_error")
    assert broken.json()["error"]["details"]["errors"] == [
        {"field": "body.11", "message": "JSON decode error", "type": "json_invalid"}
    ]
    empty = live.post(path, content=b"", headers={"content-type": "application/json"})
    assert empty.json()["error"]["details"]["errors"] == [
        {"field": "body", "message": "Field required", "type": "missing"}
    ]
    not_utf8 = live.post(path, content=b'{"device": "\xff"}', headers={"content-type": "application/json"})
    assert_error_shape(not_utf8, 400, "bad_request")


def resolve(document: dict[str, Any], reference: str) -> dict[str, Any]:
    node: Any = document
    for part in reference.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


@pytest.mark.parametrize(
    ("path", "model", "required"),
    [
        ("/v1/latency", "LatencyRequest", {"device", "architecture"}),
        ("/v1/latency/batch", "BatchLatencyRequest", {"device", "architecture", "widths"}),
        ("/v1/plans", "PlanCreate", {"device", "architecture", "budget_ms"}),
    ],
)
def test_openapi_documents_the_bodies_with_resolvable_references(
    live: Live, path: str, model: str, required: set[str]
) -> None:
    document = httpx.get(f"{live.base_url}/openapi.json", timeout=30).json()
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    assert schema == {"$ref": f"#/components/schemas/{model}"}
    assert set(resolve(document, schema["$ref"])["required"]) == required
    for reference in references(document):
        assert resolve(document, reference), reference
    assert {"Network", "TorchvisionArchitecture"} <= set(document["components"]["schemas"])
