"""Profile submission: validation, idempotent replays, skipped duplicates, per-device agent keys."""

from __future__ import annotations

import json
import math
import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from profiler.batch import MAX_BATCH_ROWS
from profiler.environment import collect_environment, non_finite_path
from profiler.sinks import HttpSink
from service.config import Settings, WorkerSettings
from service.db.models import Device, LayerMeasurement, NetworkMeasurement, ProfileBatch, ProfileRun
from service.main import create_app
from service.profiles import batch_body_sha256
from service.schemas.agent import TaskHeartbeat
from service.testing.tiny import TinyProfile
from tests.service.support import Api, api_client
from tests.service.test_health_api import LiveServer, assert_error_shape


def row_counts(api: Api) -> dict[str, int]:
    with api.factory() as session:
        return {
            table.__tablename__: int(session.scalar(select(func.count()).select_from(table)) or 0)
            for table in (NetworkMeasurement, LayerMeasurement, ProfileBatch, ProfileRun)
        }


def profiles_url(api: Api, device: int | str | None = None) -> str:
    return f"/v1/devices/{api.device_id if device is None else device}/profiles"


def test_a_batch_is_stored_with_its_counts(api: Api, tiny_profile: TinyProfile) -> None:
    batch = tiny_profile.batch_json("batch-all-0001")
    response = api.post(profiles_url(api), key="agent", json=batch)
    assert response.status_code == 201, response.text
    body = response.json()
    networks = len(batch["network_measurements"])
    layers = len(batch["layer_measurements"])
    timed_layers = sum(len(m["per_layer"] or []) for m in batch["network_measurements"])
    assert body["received"] == {"network": networks, "layer": layers}
    assert body["stored"] == {"network": networks, "layer": layers}
    assert body["skipped"] == {"network": 0, "layer": 0}
    assert body["in_network_layers"] == timed_layers > 0
    assert body["device_id"] == api.device_id and body["idempotency_key"] == "batch-all-0001"
    assert "Idempotency-Replayed" not in response.headers
    counts = row_counts(api)
    assert counts["network_measurement"] == networks
    assert counts["layer_measurement"] == layers + timed_layers
    assert counts["profile_batch"] == 1 and counts["profile_run"] == 1

    with api.factory() as session:
        stored = session.scalars(
            select(NetworkMeasurement).where(NetworkMeasurement.per_layer.is_not(None))
        ).first()
        assert stored is not None and stored.arch_hash and stored.median_ms and stored.median_ms > 0
        run = session.get(ProfileRun, body["run_id"])
        assert run is not None and run.source == "agent" and run.protocol["min_repetitions"] == 7


def test_a_replay_stores_nothing_and_answers_the_first_response(api: Api, tiny_profile: TinyProfile) -> None:
    batch = tiny_profile.batch_json("batch-replay-01", tiny_profile.network_measurements[:5])
    first = api.post(
        profiles_url(api), key="agent", json=batch, headers={"Idempotency-Key": "batch-replay-01"}
    )
    before = row_counts(api)
    replay = api.post(profiles_url(api), key="agent", json=batch)
    assert replay.status_code == first.status_code == 201
    assert replay.json() == first.json()
    assert replay.headers["Idempotency-Replayed"] == "true"
    assert row_counts(api) == before


@dataclass
class LiveApi:
    """An `Api` harness (database, keys, device) and a real server on loopback over the same database."""

    api: Api
    base_url: str

    def post(self, path: str, body: str, key: str = "agent") -> httpx.Response:
        """POST a JSON text as it is (NaN and Infinity literals included)."""
        return httpx.post(
            f"{self.base_url}{path}",
            content=body,
            headers={**self.api.headers(self.api._key(key)), "Content-Type": "application/json"},
            timeout=30,
        )


@pytest.fixture
def live_api(migrated_url: str, live_server: LiveServer) -> Iterator[LiveApi]:
    """A real uvicorn server on a fresh migrated database (each backend in turn), with keys and a device."""
    with api_client(migrated_url) as api:
        app = create_app(Settings(database_url=migrated_url, worker=WorkerSettings(embedded=False)))
        with live_server(app) as base_url:
            yield LiveApi(api, base_url)


def reordered(batch: dict[str, Any]) -> str:
    """The same batch as other JSON text: keys in reverse order, indented."""

    def reverse(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: reverse(value[key]) for key in reversed(list(value))}
        if isinstance(value, list):
            return [reverse(item) for item in value]
        return value

    return json.dumps(reverse(batch), indent=3)


def test_a_key_reused_for_another_body_is_409_and_stores_nothing(
    live_api: LiveApi, tiny_profile: TinyProfile
) -> None:
    api, url = live_api.api, profiles_url(live_api.api)
    rows = tiny_profile.network_measurements
    batch = tiny_profile.batch_json("batch-reuse-0001", rows[:3])
    first = live_api.post(url, json.dumps(batch))
    assert first.status_code == 201, first.text
    before = row_counts(api)

    other = tiny_profile.batch_json("batch-reuse-0001", rows[3:6])
    error = assert_error_shape(live_api.post(url, json.dumps(other)), 409, "idempotency_key_reused")
    assert "batch-reuse-0001" in str(error["message"]) and "new key" in str(error["message"])
    assert error["details"] == {"idempotency_key": "batch-reuse-0001", "batch_id": first.json()["batch_id"]}
    # One changed number is another body too.
    changed = json.loads(json.dumps(batch))
    changed["network_measurements"][0]["median_ms"] *= 1.01
    changed["network_measurements"][0]["p90_ms"] *= 1.01
    assert_error_shape(live_api.post(url, json.dumps(changed)), 409, "idempotency_key_reused")
    assert row_counts(api) == before

    # The same body written differently (key order, whitespace) is the same body: a replay.
    replay = live_api.post(url, reordered(batch))
    assert replay.status_code == 201 and replay.headers["Idempotency-Replayed"] == "true"
    assert replay.json() == first.json() and row_counts(api) == before
    # The other rows are stored once they come under a key of their own.
    fresh = live_api.post(url, json.dumps({**other, "idempotency_key": "batch-reuse-0002"}))
    assert fresh.status_code == 201 and fresh.json()["stored"]["network"] == 3


def test_the_body_hash_ignores_spelling_but_not_content(tiny_profile: TinyProfile) -> None:
    from profiler.batch import ProfileBatch as ProfileBatchSchema

    batch = tiny_profile.batch_json("batch-hash-0001", tiny_profile.network_measurements[:2])
    parsed = ProfileBatchSchema.from_json(json.dumps(batch))
    assert batch_body_sha256(ProfileBatchSchema.from_json(reordered(batch))) == batch_body_sha256(parsed)
    # A field left out gets its default on each parse (measured_at: the time of parsing): still one body.
    row = dict(batch["network_measurements"][0])
    del row["measured_at"]
    unstamped = json.dumps({**batch, "network_measurements": [row]})
    assert batch_body_sha256(ProfileBatchSchema.from_json(unstamped)) == batch_body_sha256(
        ProfileBatchSchema.from_json(unstamped)
    )
    other = {**batch, "network_measurements": batch["network_measurements"][:1]}
    assert batch_body_sha256(ProfileBatchSchema.from_json(json.dumps(other))) != batch_body_sha256(parsed)


def test_a_batch_stored_without_a_hash_replays_any_body_under_its_key(
    live_api: LiveApi, tiny_profile: TinyProfile
) -> None:
    api, url = live_api.api, profiles_url(live_api.api)
    rows = tiny_profile.network_measurements
    first = live_api.post(url, json.dumps(tiny_profile.batch_json("batch-legacy-001", rows[:2])))
    assert first.status_code == 201, first.text
    with api.factory() as session:
        stored = session.scalars(select(ProfileBatch)).one()
        assert stored.body_sha256 is not None and len(stored.body_sha256) == 64
        # As a batch stored before the hash was kept.
        session.execute(update(ProfileBatch).values(body_sha256=None))
        session.commit()
    before = row_counts(api)
    other = live_api.post(url, json.dumps(tiny_profile.batch_json("batch-legacy-001", rows[2:4])))
    assert other.status_code == 201 and other.headers["Idempotency-Replayed"] == "true"
    assert other.json() == first.json() and row_counts(api) == before


def test_concurrent_bodies_under_one_key_store_one_of_them(api: Api, tiny_profile: TinyProfile) -> None:
    rows = tiny_profile.network_measurements
    bodies = [
        tiny_profile.batch_json("batch-race-0002", rows[:4]),
        tiny_profile.batch_json("batch-race-0002", rows[4:8]),
    ]
    answers: list[tuple[int, Any]] = []

    def submit(which: int) -> None:
        answers.append((which, api.post(profiles_url(api), key="agent", json=bodies[which])))

    threads = [threading.Thread(target=submit, args=(i % 2,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = {which for which, response in answers if response.status_code == 201}
    assert len(stored) == 1, [(which, response.status_code) for which, response in answers]
    for which, response in answers:
        if which in stored:
            assert response.status_code == 201
        else:
            assert_error_shape(response, 409, "idempotency_key_reused")
    counts = row_counts(api)
    assert counts["profile_batch"] == 1 and counts["network_measurement"] == 4


def test_rows_the_device_has_are_skipped(api: Api, tiny_profile: TinyProfile) -> None:
    rows = tiny_profile.network_measurements
    api.post(profiles_url(api), key="agent", json=tiny_profile.batch_json("batch-skip-0001", rows[:4]))
    response = api.post(
        profiles_url(api), key="agent", json=tiny_profile.batch_json("batch-skip-0002", rows[:6])
    )
    assert response.json()["stored"]["network"] == 2
    assert response.json()["skipped"]["network"] == 4
    assert row_counts(api)["network_measurement"] == 6


def test_concurrent_submissions_of_one_key_store_it_once(api: Api, tiny_profile: TinyProfile) -> None:
    batch = tiny_profile.batch_json("batch-race-0001", tiny_profile.network_measurements[:10])
    responses: list[Any] = []

    def submit() -> None:
        responses.append(api.post(profiles_url(api), key="agent", json=batch))

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["batch_id"] for r in responses}) == 1
    assert sum("Idempotency-Replayed" in r.headers for r in responses) == 3
    assert row_counts(api)["network_measurement"] == 10
    assert row_counts(api)["profile_batch"] == 1


def test_agent_keys_submit_only_for_their_device(api: Api, tiny_profile: TinyProfile) -> None:
    other_id, other_key = api.add_device("other-cpu")
    batch = tiny_profile.batch_json("batch-auth-0001", tiny_profile.network_measurements[:1])
    assert_error_shape(
        api.post(profiles_url(api, other_id), key="agent", json=batch), 403, "permission_denied"
    )
    assert_error_shape(api.post(profiles_url(api), key=other_key, json=batch), 403, "permission_denied")
    assert_error_shape(api.post(profiles_url(api), key="reader", json=batch), 403, "permission_denied")
    assert_error_shape(api.post(profiles_url(api), key=None, json=batch), 401, "unauthenticated")
    assert api.post(profiles_url(api, other_id), key=other_key, json=batch).status_code == 201
    assert api.post(profiles_url(api, "tiny-cpu"), key="admin", json=batch).status_code == 201


def test_unknown_device_is_404(api: Api, tiny_profile: TinyProfile) -> None:
    batch = tiny_profile.batch_json("batch-404-0001", tiny_profile.network_measurements[:1])
    assert_error_shape(api.post(profiles_url(api, 4242), key="admin", json=batch), 404, "not_found")


def _with_first_row(batch: dict[str, Any], **changes: Any) -> dict[str, Any]:
    rows = [dict(batch["network_measurements"][0], **changes), *batch["network_measurements"][1:]]
    return {**batch, "network_measurements": rows}


PROBE_FIELDS = ("probe_ms", "relative_latency", "probe_version")


def _unprobed(batch: dict[str, Any], *keep: int) -> dict[str, Any]:
    """`batch` with the speed-probe fields taken off every network row but those at `keep`."""
    rows = [
        row if index in keep else {**row, **dict.fromkeys(PROBE_FIELDS)}
        for index, row in enumerate(batch["network_measurements"])
    ]
    return {**batch, "network_measurements": rows}


def test_speed_probe_fields_are_stored_with_the_row(api: Api, tiny_profile: TinyProfile) -> None:
    batch = _unprobed(tiny_profile.batch_json("batch-probe-0001", tiny_profile.network_measurements[:2]), 0)
    first = batch["network_measurements"][0]
    assert all(first[field] is not None for field in PROBE_FIELDS)  # run_profile probes CPU networks
    response = api.post(profiles_url(api), key="agent", json=batch)
    assert response.status_code == 201, response.text
    with api.factory() as session:
        rows = {r.sample_key: r for r in session.scalars(select(NetworkMeasurement))}
    stored = rows[first["sample_key"]]
    assert (stored.probe_ms, stored.relative_latency, stored.probe_version) == tuple(
        first[f] for f in PROBE_FIELDS
    )
    other = next(r for key, r in rows.items() if key != first["sample_key"])
    assert other.probe_ms is None and other.relative_latency is None and other.probe_version is None


def test_a_fully_probed_device_trains_on_latencies_at_its_nominal_probe_speed(
    api: Api, tiny_profile: TinyProfile
) -> None:
    from service.training_set import training_samples

    batch = tiny_profile.batch_json("batch-probe-0002", tiny_profile.one_per_architecture)
    assert api.post(profiles_url(api), key="agent", json=batch).status_code == 201
    rows = batch["network_measurements"]
    nominal = statistics.median(row["probe_ms"] for row in rows)
    with api.factory() as session:
        training = training_samples(session, api.device_id)
    assert training.labels == "probe" and training.nominal_probe_ms == pytest.approx(nominal)
    assert [s.latency_ms for s in training.samples] == pytest.approx(
        [r["relative_latency"] * nominal for r in rows]
    )
    layered = next(i for i, row in enumerate(rows) if row["per_layer"])
    scale = nominal / rows[layered]["probe_ms"]
    first_layer = rows[layered]["per_layer"][0]
    assert training.samples[layered].per_layer_ms is not None
    assert training.samples[layered].per_layer_ms[first_layer["layer"]] == pytest.approx(
        first_layer["ms"] * scale
    )


def test_a_device_with_unprobed_rows_trains_on_milliseconds(api: Api, tiny_profile: TinyProfile) -> None:
    from service.training_set import training_samples

    rows = tiny_profile.one_per_architecture
    batch = _unprobed(tiny_profile.batch_json("batch-probe-0003", rows), *range(len(rows) - 1))
    assert api.post(profiles_url(api), key="agent", json=batch).status_code == 201
    with api.factory() as session:
        training = training_samples(session, api.device_id)
    assert training.labels == "ms" and training.nominal_probe_ms is None
    assert [s.latency_ms for s in training.samples] == [r["median_ms"] for r in batch["network_measurements"]]


def test_repeated_timings_of_one_architecture_train_as_one_median_sample(
    api: Api, tiny_profile: TinyProfile
) -> None:
    from service.predictors import ok_network_count
    from service.training_set import training_samples

    batch = _unprobed(tiny_profile.batch_json("batch-repl-0001", tiny_profile.one_per_architecture))
    assert api.post(profiles_url(api), key="agent", json=batch).status_code == 201
    rows = batch["network_measurements"]
    index = next(i for i, row in enumerate(rows) if not row["per_layer"])
    measured = tiny_profile.one_per_architecture[index]
    assert measured.median_ms is not None and measured.p10_ms is not None and measured.p90_ms is not None
    again = [
        measured.model_copy(
            update={
                "sample_key": f"{measured.sample_key}-r{k}",
                "median_ms": measured.median_ms * factor,
                "p10_ms": measured.p10_ms * factor,
                "p90_ms": measured.p90_ms * factor,
                "mean_ms": None,
            }
        )
        for k, factor in ((1, 1.5), (2, 4.0))
    ]
    replicates = _unprobed(tiny_profile.batch_json("batch-repl-0002", again))
    assert api.post(profiles_url(api), key="agent", json=replicates).status_code == 201
    with api.factory() as session:
        training = training_samples(session, api.device_id)
        architectures = ok_network_count(session, api.device_id)
    # Three timings of one network (x1, x1.5, x4): one sample at their median, no duplicate.
    assert architectures == len(rows) == len(training.samples)
    assert training.timings == len(rows) + 2
    latencies = [s.latency_ms for s in training.samples]
    assert latencies[index] == pytest.approx(rows[index]["median_ms"] * 1.5)
    others = [r["median_ms"] for i, r in enumerate(rows) if i != index]
    assert latencies[:index] + latencies[index + 1 :] == others
    hashes = [s.network.content_hash for s in training.samples]
    assert len(set(hashes)) == len(hashes)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"median_ms": -1.0, "p10_ms": -2.0}, "median_ms"),
        ({"probe_version": None}, "probe_version come together"),
        ({"p90_ms": 1e-9}, "percentiles"),
        ({"cv": -0.5}, "cv"),
        ({"architecture": {"input_shape": [1, 3, 32, 32], "layers": [], "outputs": ["x"]}}, "layers"),
        ({"kind": "isolated"}, "layer"),
        ({"status": "failed"}, "error"),
    ],
)
def test_invalid_rows_are_422(
    api: Api, tiny_profile: TinyProfile, change: dict[str, Any], field: str
) -> None:
    batch = _with_first_row(
        tiny_profile.batch_json("batch-bad-0001", tiny_profile.network_measurements[:2]), **change
    )
    error = assert_error_shape(api.post(profiles_url(api), key="agent", json=batch), 422, "validation_error")
    assert field in str(error["message"])
    assert row_counts(api)["network_measurement"] == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_latencies_are_422(api: Api, tiny_profile: TinyProfile, value: float) -> None:
    batch = _with_first_row(
        tiny_profile.batch_json("batch-nan-00001", tiny_profile.network_measurements[:1]), median_ms=value
    )
    # json.dumps writes NaN and Infinity literals, which the server's JSON parser reads as floats.
    response = api.post(
        profiles_url(api),
        key="agent",
        content=json.dumps(batch),
        headers={"Content-Type": "application/json"},
    )
    error = assert_error_shape(response, 422, "validation_error")
    assert "finite" in str(error["message"])


# NaN and infinity: JSON has neither, so a stored one is a non-standard document (SQLite) or an error
# (PostgreSQL). json.dumps writes NaN and Infinity literals, which the server's JSON parser reads.


def _set_first_row(batch: dict[str, Any], **changes: Any) -> None:
    batch["network_measurements"][0].update(changes)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (
            lambda b: _set_first_row(b, status="failed", error="RuntimeError: boom", median_ms=math.nan),
            "body.network_measurements.0.median_ms",
            "finite number",
        ),
        (
            lambda b: _set_first_row(b, mean_ms=math.inf),
            "body.network_measurements.0.mean_ms",
            "finite number",
        ),
        (
            lambda b: b["environment"]["backend_settings"].update(clocks={"boost": [3.1, math.nan]}),
            "body.environment.backend_settings.clocks",
            "boost.1 is not a finite number",
        ),
        (
            lambda b: b["environment"].update(gpu_temperature=-math.inf),
            "body.environment.gpu_temperature",
            "not a finite number",
        ),
        (
            lambda b: b["environment"].update(load_average=[math.nan, 0.1, 0.1]),
            "body.environment.load_average.0",
            "finite number",
        ),
    ],
    ids=["failed-row-median", "mean", "backend-settings", "environment-extra", "load-average"],
)
def test_nan_and_infinity_in_a_batch_are_422_naming_the_field(
    live_api: LiveApi, tiny_profile: TinyProfile, change: Any, field: str, message: str
) -> None:
    batch = tiny_profile.batch_json("batch-nonfinite-1", tiny_profile.network_measurements[:2])
    change(batch)
    error = assert_error_shape(
        live_api.post(profiles_url(live_api.api), json.dumps(batch)), 422, "validation_error"
    )
    [reported] = error["details"]["errors"]  # type: ignore[index]
    assert reported["field"] == field and message in reported["message"]
    assert field in str(error["message"])
    assert row_counts(live_api.api) == dict.fromkeys(
        ("network_measurement", "layer_measurement", "profile_batch", "profile_run"), 0
    )


def test_nan_in_an_environment_given_at_registration_or_hello_is_422_naming_it(live_api: LiveApi) -> None:
    environment = collect_environment().model_dump(mode="json")
    device = {"name": "nan-cpu", "hardware": "test-cpu", "environment": {"gpu": {"clocks": [1.0, math.nan]}}}
    error = assert_error_shape(
        live_api.post("/v1/devices", json.dumps(device), key="admin"), 422, "validation_error"
    )
    [reported] = error["details"]["errors"]  # type: ignore[index]
    assert (
        reported["field"] == "body.environment.gpu"
        and "clocks.1 is not a finite number" in reported["message"]
    )

    hello = {"agent_id": "agent-1", "environment": {**environment, "cpu_max_mhz": math.inf}}
    error = assert_error_shape(live_api.post("/v1/agent/hello", json.dumps(hello)), 422, "validation_error")
    [reported] = error["details"]["errors"]  # type: ignore[index]
    assert reported["field"] == "body.environment.cpu_max_mhz"
    with live_api.api.factory() as session:
        names = [row.name for row in session.scalars(select(Device))]
        stored = session.scalars(select(Device.environment)).all()
    assert names == ["tiny-cpu"] and all(non_finite_path(value) is None for value in stored)


def test_task_progress_and_results_name_a_non_finite_number() -> None:
    with pytest.raises(ValidationError) as info:
        TaskHeartbeat.model_validate({"agent_id": "a1", "progress": {"phase": "x", "rates": [1.0, math.inf]}})
    [error] = info.value.errors()
    assert error["loc"] == ("progress", "rates") and "1 is not a finite number" in error["msg"]


def test_batches_over_the_row_cap_are_422(api: Api, tiny_profile: TinyProfile) -> None:
    batch = tiny_profile.batch_json("batch-cap-00001", tiny_profile.network_measurements[:1])
    row = batch["network_measurements"][0]
    rows = [dict(row, sample_key=f"network-{i:040d}") for i in range(MAX_BATCH_ROWS + 1)]
    error = assert_error_shape(
        api.post(profiles_url(api), key="agent", json={**batch, "network_measurements": rows}),
        422,
        "validation_error",
    )
    assert f"1..{MAX_BATCH_ROWS}" in str(error["message"])


def test_header_and_body_keys_must_agree(api: Api, tiny_profile: TinyProfile) -> None:
    batch = tiny_profile.batch_json("batch-keys-0001", tiny_profile.network_measurements[:1])
    response = api.post(
        profiles_url(api), key="agent", json=batch, headers={"Idempotency-Key": "other-key-0001"}
    )
    assert_error_shape(response, 422, "invalid_input")


def test_measurements_of_other_device_settings_are_refused(api: Api, tiny_profile: TinyProfile) -> None:
    batch = tiny_profile.batch_json("batch-spec-0001", tiny_profile.network_measurements[:1])
    batch["device"] = dict(batch["device"], threads=2)
    error = assert_error_shape(api.post(profiles_url(api), key="agent", json=batch), 422, "invalid_input")
    assert "threads 2" in str(error["message"])
    renamed = tiny_profile.batch_json("batch-spec-0002", tiny_profile.network_measurements[:1])
    renamed["device"] = dict(renamed["device"], hardware="another name")
    response = api.post(profiles_url(api), key="agent", json=renamed)
    assert response.status_code == 201 and "another name" in response.json()["warnings"][0]


def test_oversize_bodies_are_413(sqlite_migrated_url: str, tiny_profile: TinyProfile) -> None:
    with api_client(sqlite_migrated_url, max_request_bytes=2048) as api:
        batch = tiny_profile.batch_json("batch-big-00001", tiny_profile.network_measurements[:3])
        response = api.post(profiles_url(api), key="agent", json=batch)
        assert_error_shape(response, 413, "request_too_large")


def test_the_profilers_http_sink_delivers_to_a_real_server(
    migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer, tmp_path: Any
) -> None:
    with api_client(migrated_url) as api:
        app = create_app(Settings(database_url=migrated_url, worker=WorkerSettings(embedded=False)))
        with live_server(app) as base_url:
            sink = HttpSink(
                base_url, "tiny-cpu", api.keys.agent, tiny_profile.context, tmp_path / "spool", batch_size=10
            )
            for measurement in tiny_profile.measurements:
                sink.write(measurement)
            sink.close()
            assert sink.posted_batches == -(-len(tiny_profile.measurements) // 10)
            # A second sink over the same spool resends nothing.
            again = HttpSink(base_url, "tiny-cpu", api.keys.agent, tiny_profile.context, tmp_path / "spool")
            assert again.done_keys() >= {m.sample_key for m in tiny_profile.measurements}
            again.close()
        counts = row_counts(api)
        assert counts["network_measurement"] == len(tiny_profile.network_measurements)
        assert counts["profile_batch"] == sink.posted_batches
