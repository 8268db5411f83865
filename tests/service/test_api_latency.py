"""Latency queries with a real predictor fitted on real measurements of the tiny network."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.arch.onnx_io import export_onnx
from service.latency import LatencyService
from service.testing.tiny import TINY_INPUT_SHAPE, TinyProfile, tiny_module
from tests.service.support import Api, api_client
from tests.service.test_health_api import assert_error_shape


def ir(profile: TinyProfile) -> dict[str, Any]:
    network: dict[str, Any] = profile.network.model_dump(mode="json")
    return network


def test_latency_of_an_ir_network(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    api = api_with_predictor
    response = api.post(
        "/v1/latency", key="reader", json={"device": "tiny-cpu", "architecture": ir(tiny_profile)}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictor"] == {"id": api.extra["predictor_id"], "version": 1}
    assert body["device"] == "tiny-cpu" and body["network_hash"] == tiny_profile.network.content_hash
    assert 0 < body["low_ms"] <= body["total_ms"] <= body["high_ms"]
    assert [layer["name"] for layer in body["per_layer"]] == [
        layer.name for layer in tiny_profile.network.layers
    ]
    assert all(layer["ms"] > 0 for layer in body["per_layer"])
    assert math.isclose(
        sum(layer["ms"] for layer in body["per_layer"]) + body["overhead_ms"], body["total_ms"], rel_tol=0.05
    )
    # The unpruned tiny network was measured: the prediction is near the measurement, without warnings.
    measured = next(
        m.median_ms
        for m in tiny_profile.network_measurements
        if m.architecture == tiny_profile.network and m.median_ms
    )
    assert body["total_ms"] == pytest.approx(measured, rel=0.5)
    assert body["warnings"] == []


def test_pruned_networks_are_predicted_faster(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    api = api_with_predictor
    full = channel_layout(tiny_profile.network).full_widths
    pruned = apply_width_vector(tiny_profile.network, [max(8, w // 4) for w in full])
    totals = [
        api.post(
            "/v1/latency",
            key="reader",
            json={"device": api.device_id, "architecture": net.model_dump(mode="json")},
        ).json()["total_ms"]
        for net in (tiny_profile.network, pruned)
    ]
    assert totals[1] < totals[0]


def test_torchvision_names_are_traced_once_and_extrapolation_is_flagged(api_with_predictor: Api) -> None:
    api = api_with_predictor
    request = {
        "device": "tiny-cpu",
        "architecture": {"torchvision": "resnet18", "input_shape": [1, 3, 64, 64]},
    }
    first = api.post("/v1/latency", key="reader", json=request)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["network_name"] == "resnet18" and body["total_ms"] > 0
    assert body["warnings"], "resnet18 is far outside what the tiny predictor was fitted on"
    second = api.post("/v1/latency", key="reader", json=request)
    assert second.json() == body
    latency: LatencyService = api.app.state.latency
    assert latency.torchvision.misses == 1 and latency.torchvision.hits >= 1
    assert latency.predictors.misses == 1


def test_unknown_models_and_bad_shapes_are_422(api_with_predictor: Api) -> None:
    api = api_with_predictor
    unknown = api.post(
        "/v1/latency", key="reader", json={"device": "tiny-cpu", "architecture": {"torchvision": "resnet19"}}
    )
    assert "resnet19" in str(assert_error_shape(unknown, 422, "unknown_model")["message"])
    huge = {"torchvision": "resnet18", "input_shape": [64, 3, 1024, 1024]}
    assert_error_shape(
        api.post("/v1/latency", key="reader", json={"device": "tiny-cpu", "architecture": huge}),
        422,
        "validation_error",
    )
    broken = {"input_shape": [1, 3, 32, 32], "layers": [{"name": "a", "op": "conv2d"}], "outputs": ["a"]}
    assert_error_shape(
        api.post("/v1/latency", key="reader", json={"device": "tiny-cpu", "architecture": broken}),
        422,
        "validation_error",
    )


def test_a_device_without_predictor_is_409_with_its_status(api: Api, tiny_profile: TinyProfile) -> None:
    api.store_measurements(api.device_id, tiny_profile.network_measurements[:3])
    response = api.post(
        "/v1/latency", key="reader", json={"device": "tiny-cpu", "architecture": ir(tiny_profile)}
    )
    error = assert_error_shape(response, 409, "no_predictor")
    assert error["details"]["status"]["phase"] == "profiled"  # type: ignore[index]
    assert error["details"]["profiling"]["network"]["ok"] == 3  # type: ignore[index]
    assert "total_ms" not in response.text


def test_unknown_device_is_404(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    response = api_with_predictor.post(
        "/v1/latency", key="reader", json={"device": "nope", "architecture": ir(tiny_profile)}
    )
    assert_error_shape(response, 404, "not_found")


def test_batch_of_width_vectors(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    api = api_with_predictor
    layout = channel_layout(tiny_profile.network)
    full = layout.full_widths
    widths = [
        full,
        [max(g.divisor, w // 2) for g, w in zip(layout.groups, full, strict=True)],
        [8] * len(full),
    ]
    response = api.post(
        "/v1/latency/batch",
        key="reader",
        json={"device": "tiny-cpu", "architecture": ir(tiny_profile), "widths": widths},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == 3 and body["group_channels"] == full
    assert all(
        lo <= t <= hi for lo, t, hi in zip(body["low_ms"], body["total_ms"], body["high_ms"], strict=True)
    )
    assert body["total_ms"][0] > body["total_ms"][2]
    # The batch path and the single path agree on the unpruned network.
    single = api.post(
        "/v1/latency", key="reader", json={"device": "tiny-cpu", "architecture": ir(tiny_profile)}
    ).json()
    assert body["total_ms"][0] == pytest.approx(single["total_ms"], rel=1e-3)


def test_bad_width_vectors_are_named(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    api = api_with_predictor
    full = channel_layout(tiny_profile.network).full_widths
    request = {"device": "tiny-cpu", "architecture": ir(tiny_profile)}
    too_wide = api.post(
        "/v1/latency/batch", key="reader", json={**request, "widths": [full, [w + 1 for w in full]]}
    )
    error = assert_error_shape(too_wide, 422, "invalid_width_vector")
    assert str(error["message"]).startswith("widths[1]:") and error["details"]["index"] == 1  # type: ignore[index]
    short = api.post("/v1/latency/batch", key="reader", json={**request, "widths": [full[:-1]]})
    assert "widths[0]" in str(assert_error_shape(short, 422, "invalid_width_vector")["message"])
    assert_error_shape(
        api.post("/v1/latency/batch", key="reader", json={**request, "widths": []}), 422, "validation_error"
    )


def test_the_batch_cap_comes_from_the_settings(migrated_url: str, tiny_profile: TinyProfile) -> None:
    with api_client(migrated_url, max_width_vectors=5) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, tiny_profile.fitted)
        full = channel_layout(tiny_profile.network).full_widths
        request = {"device": "tiny-cpu", "architecture": ir(tiny_profile)}
        assert (
            api.post("/v1/latency/batch", key="reader", json={**request, "widths": [full] * 5}).status_code
            == 200
        )
        error = assert_error_shape(
            api.post("/v1/latency/batch", key="reader", json={**request, "widths": [full] * 6}),
            422,
            "invalid_input",
        )
        assert "at most 5" in str(error["message"])


def test_ten_thousand_width_vectors(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    layout = channel_layout(tiny_profile.network)
    generator = torch.Generator().manual_seed(0)
    widths = [
        [
            int(torch.randint(1, g.channels // g.divisor + 1, (1,), generator=generator)) * g.divisor
            for g in layout.groups
        ]
        for _ in range(10_000)
    ]
    response = api_with_predictor.post(
        "/v1/latency/batch",
        key="reader",
        json={"device": "tiny-cpu", "architecture": ir(tiny_profile), "widths": widths},
    )
    assert response.status_code == 200 and len(response.json()["total_ms"]) == 10_000


def test_onnx_upload(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    api = api_with_predictor
    data = export_onnx(tiny_module().eval(), TINY_INPUT_SHAPE)
    response = api.post(
        "/v1/latency/onnx", key="reader", files={"file": ("tiny.onnx", data)}, data={"device": "tiny-cpu"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    direct = api.post(
        "/v1/latency", key="reader", json={"device": "tiny-cpu", "architecture": ir(tiny_profile)}
    ).json()
    assert body["network_name"] == "tiny.onnx"
    assert body["total_ms"] == pytest.approx(direct["total_ms"], rel=0.25)
    garbage = api.post(
        "/v1/latency/onnx", key="reader", files={"file": ("x.onnx", b"not onnx")}, data={"device": "tiny-cpu"}
    )
    assert_error_shape(garbage, 422, "invalid_architecture")
    missing = api.post("/v1/latency/onnx", key="reader", data={"device": "tiny-cpu"})
    assert_error_shape(missing, 422, "validation_error")


def test_onnx_uploads_are_size_capped(migrated_url: str, tiny_profile: TinyProfile) -> None:
    with api_client(migrated_url, max_onnx_bytes=1000) as api:
        api.store_measurements(api.device_id, tiny_profile.network_measurements)
        api.store_predictor(api.device_id, tiny_profile.fitted)
        data = export_onnx(tiny_module().eval(), TINY_INPUT_SHAPE)
        response = api.post(
            "/v1/latency/onnx", key="reader", files={"file": ("tiny.onnx", data)}, data={"device": "tiny-cpu"}
        )
        assert "1000 bytes" in str(assert_error_shape(response, 413, "request_too_large")["message"])


def test_an_unreadable_stored_predictor_is_409_asking_for_a_refit(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    api = api_with_predictor
    broken = tiny_profile.fitted.__class__(**{**tiny_profile.fitted.__dict__, "artifact": b"not safetensors"})
    api.store_predictor(api.device_id, broken)
    response = api.post(
        "/v1/latency", key="reader", json={"device": "tiny-cpu", "architecture": ir(tiny_profile)}
    )
    error = assert_error_shape(response, 409, "predictor_artifact_unreadable")
    assert "truncated" in str(error["message"]) or "header" in str(error["message"])
