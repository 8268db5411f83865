"""Devices over HTTP: registration with an agent key, listing, profiling counts, predictor, status."""

from __future__ import annotations

from service.testing.tiny import TinyProfile
from tests.service.support import Api
from tests.service.test_health_api import assert_error_shape


def test_register_returns_the_device_and_an_agent_key_once(api: Api, tiny_profile: TinyProfile) -> None:
    response = api.post(
        "/v1/devices",
        json={"name": "pi4", "hardware": "test-cpu", "threads": 1, "is_local": False},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "pi4" and body["threads"] == 1 and body["is_local"] is False
    assert body["agent_key"].startswith("lpn_") and body["agent_key"].startswith(body["agent_key_prefix"])
    assert body["status"]["phase"] == "registered"
    assert body["profiling"]["network"] == {"ok": 0, "failed": 0}
    assert body["predictor"] is None

    # The key is the device's agent key: it may submit for it, and is never shown again.
    batch = tiny_profile.batch_json("first-batch-0001", tiny_profile.network_measurements[:2])
    submitted = api.post(f"/v1/devices/{body['id']}/profiles", key=body["agent_key"], json=batch)
    assert submitted.status_code == 201, submitted.text
    shown = api.get(f"/v1/devices/{body['id']}", key="reader").json()
    assert "agent_key" not in shown
    assert shown["profiling"]["network"] == {"ok": 2, "failed": 0}


def test_list_and_show_by_id_or_name(api: Api) -> None:
    api.add_device("laptop-1t")
    listed = api.get("/v1/devices", key="reader")
    assert listed.status_code == 200
    assert [device["name"] for device in listed.json()["items"]] == ["laptop-1t", "tiny-cpu"]
    assert listed.json()["next_cursor"] is None
    by_id = api.get(f"/v1/devices/{api.device_id}", key="reader").json()
    by_name = api.get("/v1/devices/tiny-cpu", key="reader").json()
    assert by_id == by_name and by_id["id"] == api.device_id


def test_unknown_device_is_404(api: Api) -> None:
    assert_error_shape(api.get("/v1/devices/9999", key="reader"), 404, "not_found")
    error = assert_error_shape(api.get("/v1/devices/nope", key="reader"), 404, "not_found")
    assert "nope" in str(error["message"])
    # Characters Python calls digits that are not 0-9 ("²", "٣") are read as names, never as ids.
    for ref in ("²", "٣", "1²"):
        error = assert_error_shape(api.get(f"/v1/devices/{ref}", key="reader"), 404, "not_found")
        assert ref in str(error["message"])


def test_invalid_and_duplicate_registrations(api: Api) -> None:
    digits = api.post("/v1/devices", json={"name": "1234", "hardware": "cpu"})
    assert "all digits" in str(assert_error_shape(digits, 422, "validation_error")["message"])
    bad_backend = api.post("/v1/devices", json={"name": "x", "hardware": "cpu", "backend": "tpu-magic"})
    assert_error_shape(bad_backend, 422, "validation_error")
    extra = api.post("/v1/devices", json={"name": "x", "hardware": "cpu", "colour": "red"})
    assert_error_shape(extra, 422, "validation_error")
    duplicate = api.post("/v1/devices", json={"name": "tiny-cpu", "hardware": "cpu"})
    assert_error_shape(duplicate, 409, "conflict")


def test_status_follows_measurements_and_predictor(api: Api, tiny_profile: TinyProfile) -> None:
    api.store_measurements(api.device_id, tiny_profile.measurements)
    device = api.get(f"/v1/devices/{api.device_id}", key="reader").json()
    networks = len(tiny_profile.network_measurements)
    in_context = sum(1 for m in tiny_profile.measurements if m.per_layer)
    isolated = len(tiny_profile.measurements) - networks
    assert device["status"]["phase"] == "profiled"
    assert device["profiling"]["network"]["ok"] == networks
    assert device["profiling"]["isolated"]["ok"] == isolated
    assert device["profiling"]["in_network"]["ok"] >= in_context  # one row per timed layer
    assert device["profiling"]["last_measured_at"] is not None

    predictor_id = api.store_predictor(api.device_id, tiny_profile.fitted)
    device = api.get(f"/v1/devices/{api.device_id}", key="reader").json()
    assert device["status"]["phase"] == "ready"
    assert device["predictor"]["id"] == predictor_id and device["predictor"]["version"] == 1
    assert device["predictor"]["metrics"]["lpnet"]["count"] > 0

    second = api.store_predictor(api.device_id, tiny_profile.fitted)
    device = api.get(f"/v1/devices/{api.device_id}", key="reader").json()
    assert device["predictor"]["id"] == second and device["predictor"]["version"] == 2
    versions = api.get(f"/v1/devices/{api.device_id}/predictors", key="reader").json()["items"]
    assert [p["version"] for p in versions] == [2, 1]


def test_metrics_endpoint_counts_requests(api: Api) -> None:
    api.get("/v1/devices", key="reader")
    metrics = api.get("/metrics", key="admin")
    assert metrics.status_code == 200
    assert 'handler="/v1/devices"' in metrics.text
    assert "http_request_duration_seconds" in metrics.text
    # Probes are not measured; the metrics endpoint needs an admin key.
    api.client.get("/healthz")
    assert 'handler="/healthz"' not in api.get("/metrics", key="admin").text


def test_every_answer_carries_a_request_id(api: Api) -> None:
    response = api.get("/v1/devices", key="reader")
    assert response.headers["X-Request-ID"]
    echoed = api.get("/v1/devices", key="reader", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"


def test_keys_revoked_through_the_api_stop_working_at_once(api: Api) -> None:
    created = api.post("/v1/keys", json={"scope": "reader", "name": "short-lived"})
    assert created.status_code == 201
    key = created.json()["key"]
    assert api.get("/v1/devices", key=key).status_code == 200  # now cached as valid
    revoked = api.delete(f"/v1/keys/{created.json()['prefix']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert_error_shape(api.get("/v1/devices", key=key), 401, "unauthenticated")


def test_the_key_cache_trusts_a_key_for_its_ttl_only() -> None:
    from service.auth import KeyCache
    from service.db.models import ApiKey

    now = [0.0]
    cache = KeyCache(10.0, clock=lambda: now[0])
    row = ApiKey(name="k", prefix="lpn_abcdefgh", key_hash="0" * 64, scope="reader")
    assert cache.get("lpn_abcdefgh-key") is None
    cache.put("lpn_abcdefgh-key", row, cache.generation)
    now[0] = 9.9
    assert cache.get("lpn_abcdefgh-key") is row
    assert cache.get("lpn_other") is None
    now[0] = 10.0
    assert cache.get("lpn_abcdefgh-key") is None
    off = KeyCache(0.0)
    off.put("lpn_abcdefgh-key", row, off.generation)
    assert off.get("lpn_abcdefgh-key") is None
