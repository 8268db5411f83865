"""Architectures beyond the IR's bounds are refused with a 422 naming what was too large, over real HTTP.

Also: a torchvision name that cannot be traced fails the same way again without tracing again, and
traces beyond the server's concurrency limit are answered 429 with Retry-After.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from lpnet.arch.groups import channel_layout
from lpnet.arch.ir import MAX_BATCH, MAX_CHANNELS, MAX_LAYERS, MAX_SPATIAL, MAX_WINDOW
from service.config import Settings, WorkerSettings
from service.latency import LatencyService
from service.main import create_app
from service.testing.tiny import TinyProfile
from tests.service.support import Api, api_client
from tests.service.test_health_api import LiveServer, assert_error_shape

ENDPOINTS = ("/v1/latency", "/v1/latency/batch", "/v1/plans")


@dataclass
class LiveLatency:
    """A real server on loopback, the `Api` harness over the same database, and the server's latency service."""

    api: Api
    base_url: str
    latency: LatencyService

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = self.api.headers(self.api.keys.reader)
        return httpx.post(f"{self.base_url}{path}", json=body, headers=headers, timeout=120)


@pytest.fixture
def live(
    sqlite_migrated_url: str, live_server: LiveServer, tiny_profile: TinyProfile
) -> Iterator[LiveLatency]:
    """Device "tiny-cpu" has a predictor; device "bare-cpu" has none, so nothing past validation runs for it."""
    with api_client(sqlite_migrated_url) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, tiny_profile.fitted)
        api.add_device("bare-cpu")
        app = create_app(Settings(database_url=sqlite_migrated_url, worker=WorkerSettings(embedded=False)))
        with live_server(app) as base_url:
            yield LiveLatency(api, base_url, app.state.latency)


def request_body(path: str, device: str, architecture: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"device": device, "architecture": architecture}
    if path == "/v1/latency/batch":
        body["widths"] = [[8]]
    elif path == "/v1/plans":
        body["budget_ms"] = 1.0
    return body


def tiny_architecture(profile: TinyProfile) -> dict[str, Any]:
    architecture: dict[str, Any] = profile.network.model_dump(mode="json")
    return architecture


def validation_errors(response: httpx.Response) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = assert_error_shape(response, 422, "validation_error")["details"]["errors"]  # type: ignore[index]
    return errors


# (path inside the architecture, the bound its error names)
DIMENSIONS: list[tuple[tuple[str | int, ...], int]] = [
    (("input_shape", 0), MAX_BATCH),
    (("input_shape", 2), MAX_SPATIAL),
    (("layers", 0, "in_channels"), MAX_CHANNELS),
    (("layers", 0, "out_channels"), MAX_CHANNELS),
    (("layers", 0, "in_hw", 0), MAX_SPATIAL),
    (("layers", 0, "kernel", 1), MAX_WINDOW),
    (("layers", 0, "stride", 0), MAX_WINDOW),
    (("layers", 0, "padding", 0), MAX_WINDOW),
    (("layers", 0, "dilation", 1), MAX_WINDOW),
    (("layers", 0, "groups"), MAX_CHANNELS),
]


def test_every_dimension_over_its_bound_is_a_422_naming_the_field(
    live: LiveLatency, tiny_profile: TinyProfile
) -> None:
    for path in ENDPOINTS:
        for where, bound in DIMENSIONS:
            for value in (10**9, 10**400):
                architecture = tiny_architecture(tiny_profile)
                architecture["layers"][0].update(stride=[1, 1], dilation=[1, 1])
                target: Any = architecture
                for key in where[:-1]:
                    target = target[key]
                target[where[-1]] = value
                response = live.post(path, request_body(path, "bare-cpu", architecture))
                field = ".".join(str(part) for part in ("body", "architecture", "ir", *where))
                assert {
                    "field": field,
                    "message": f"Input should be less than or equal to {bound}",
                    "type": "less_than_equal",
                } in validation_errors(response), (path, field, value)


def conv(name: str, channels: tuple[int, int], side: int, kernel: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "op": "conv2d",
        "inputs": ["input"],
        "in_channels": channels[0],
        "out_channels": channels[1],
        "in_hw": [side, side],
        "out_hw": [side, side],
        "kernel": [kernel, kernel],
        "padding": [kernel // 2, kernel // 2],
    }


@pytest.mark.parametrize("path", ENDPOINTS)
def test_costly_networks_are_a_422_naming_the_bound_and_the_value(live: LiveLatency, path: str) -> None:
    too_many_weights = {
        "input_shape": [1, 65536, 1, 1],
        "layers": [conv("fc", (65536, 65536), 1)],
        "outputs": ["fc"],
    }
    too_much_work = {
        "input_shape": [1, 4096, 256, 256],
        "layers": [conv("c", (4096, 4096), 256, kernel=3)],
        "outputs": ["c"],
    }
    for architecture, bound, value in (
        (too_many_weights, "MAX_PARAMS", 65536 * 65536),
        (too_much_work, "MAX_MACS", 4096 * 4096 * 9 * 256 * 256),
    ):
        (error,) = validation_errors(live.post(path, request_body(path, "bare-cpu", architecture)))
        assert error["field"] == "body.architecture.ir" and error["type"] == "architecture_too_large"
        assert bound in error["message"] and f"{value:,}" in error["message"]


def relu_chain(profile: TinyProfile, length: int) -> dict[str, Any]:
    """The tiny network's stem conv followed by relus, `length` layers in all."""
    architecture = tiny_architecture(profile)
    stem = architecture["layers"][0]
    layers = [stem]
    for i in range(1, length):
        layers.append(
            {
                "name": f"relu{i}",
                "op": "relu",
                "inputs": [layers[-1]["name"]],
                "in_channels": stem["out_channels"],
                "out_channels": stem["out_channels"],
                "in_hw": stem["out_hw"],
                "out_hw": stem["out_hw"],
            }
        )
    return {"input_shape": architecture["input_shape"], "layers": layers, "outputs": [layers[-1]["name"]]}


def test_layer_count_is_capped_and_thousands_of_layers_are_checked_quickly(
    live: LiveLatency, tiny_profile: TinyProfile
) -> None:
    over = relu_chain(tiny_profile, MAX_LAYERS + 1)
    (error,) = validation_errors(live.post("/v1/latency", request_body("/v1/latency", "bare-cpu", over)))
    assert error["field"] == "body.architecture.ir.layers"
    assert f"at most {MAX_LAYERS} items" in error["message"]

    repeated = relu_chain(tiny_profile, 4000)
    repeated["layers"][-1]["name"] = "relu1"
    repeated["outputs"] = ["relu1"]
    # CPU time of this process, which runs the server: another process's load cannot inflate it the
    # way it inflates the wall clock, and a check quadratic in the layers would take far longer.
    start = time.process_time()
    response = live.post("/v1/latency", request_body("/v1/latency", "bare-cpu", repeated))
    assert time.process_time() - start < 2.0
    (error,) = validation_errors(response)
    assert "layer names must be unique; repeated: ['relu1']" in error["message"]


def test_a_torchvision_model_too_costly_at_its_input_is_refused_once_and_remembered(
    live: LiveLatency,
) -> None:
    body = request_body("/v1/latency", "tiny-cpu", {"torchvision": "vgg19", "input_shape": [32, 3, 672, 672]})
    first = assert_error_shape(live.post("/v1/latency", body), 422, "architecture_too_large")
    assert "MAX_MACS" in str(first["message"])
    again = assert_error_shape(live.post("/v1/latency", body), 422, "architecture_too_large")
    assert again == first
    assert live.latency.torchvision.misses == 1, "the second request did not trace again"


def test_an_unsupported_torchvision_model_fails_the_same_way_without_tracing_again(live: LiveLatency) -> None:
    for path in ENDPOINTS:
        # MaxViT's partitions of 7x7 positions cannot divide the maps of a 64x64 input.
        body = request_body(path, "tiny-cpu", {"torchvision": "maxvit_t", "input_shape": [1, 3, 64, 64]})
        error = assert_error_shape(live.post(path, body), 422, "invalid_architecture")
        assert error["details"] == {"model": "maxvit_t", "input_hw": [64, 64]}
    assert live.latency.torchvision.misses == 1


@pytest.mark.parametrize("path", ENDPOINTS)
def test_traces_beyond_the_concurrency_limit_are_429_with_retry_after(live: LiveLatency, path: str) -> None:
    slots = live.latency.trace_slots
    for _ in range(live.latency.max_concurrent_traces):
        assert slots.acquire(blocking=False)
    body = request_body(path, "tiny-cpu", {"torchvision": "resnet18", "input_shape": [1, 3, 64, 64]})
    try:
        response = live.post(path, copy.deepcopy(body))
        error = assert_error_shape(response, 429, "busy")
        assert int(response.headers["Retry-After"]) >= 1
        assert error["details"]["retry_after_seconds"] == int(response.headers["Retry-After"])  # type: ignore[index]
    finally:
        for _ in range(live.latency.max_concurrent_traces):
            slots.release()
    assert live.latency.torchvision.misses == 1 and len(live.latency.torchvision) == 0, (
        "a busy answer is not cached"
    )
    response = live.post("/v1/latency", request_body("/v1/latency", "tiny-cpu", body["architecture"]))
    assert response.status_code == 200, response.text


def test_a_width_beyond_any_channel_count_is_a_422_naming_the_vector(
    live: LiveLatency, tiny_profile: TinyProfile
) -> None:
    full = channel_layout(tiny_profile.network).full_widths
    for value in (10**9, 10**400):
        widths = [full, [*full[:-1], value]]
        body = {
            **request_body("/v1/latency/batch", "tiny-cpu", tiny_architecture(tiny_profile)),
            "widths": widths,
        }
        error = assert_error_shape(live.post("/v1/latency/batch", body), 422, "invalid_width_vector")
        assert str(error["message"]).startswith(f"widths[1]: group {len(full) - 1} keeps {value} channels")
        assert error["details"]["index"] == 1 and error["details"]["value"] == value  # type: ignore[index]
