from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from lpnet.arch.ir import Layer, Network, Op
from profiler.batch import MAX_BATCH_ROWS, LayerTime, Measurement, MeasurementKind, ProfileBatch, RunContext
from profiler.device import DeviceSpec
from profiler.environment import collect_environment
from profiler.errors import InvalidBatch
from profiler.protocol import TimingProtocol


@pytest.fixture(scope="module")
def context() -> RunContext:
    return RunContext(
        device=DeviceSpec(hardware="test-cpu"), environment=collect_environment(), protocol=TimingProtocol()
    )


def conv_layer() -> Layer:
    return Layer(
        name="conv",
        op=Op.CONV2D,
        inputs=["input"],
        in_channels=8,
        out_channels=16,
        in_hw=(8, 8),
        out_hw=(8, 8),
        kernel=(3, 3),
        padding=(1, 1),
    )


def network_row(network: Network, key: str = "network-0001", **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sample_key": key,
        "kind": "network",
        "family": "tiny",
        "architecture": network,
        "width_vector": [8, 16],
        "median_ms": 1.0,
        "p10_ms": 0.9,
        "p90_ms": 1.2,
        "mean_ms": 1.05,
        "cv": 0.04,
        "repetitions": 30,
    }
    row.update(overrides)
    return row


def in_context_row(network: Network, key: str = "incontext-0001") -> dict[str, Any]:
    per_layer = [LayerTime(layer=layer.name, ms=0.01) for layer in network.layers]
    total = sum(t.ms for t in per_layer)
    return network_row(
        network, key, kind="in_context", per_layer=per_layer, layers_sum_ms=total, residual_ms=1.0 - total
    )


def layer_row(key: str = "isolated-0001", **overrides: Any) -> dict[str, Any]:
    row = {
        "sample_key": key,
        "kind": "isolated",
        "layer": conv_layer(),
        "median_ms": 0.1,
        "p10_ms": 0.09,
        "p90_ms": 0.12,
        "repetitions": 50,
    }
    row.update(overrides)
    return row


def test_batch_round_trips_through_json(tiny_network: Network, context: RunContext) -> None:
    rows = [
        Measurement.model_validate(network_row(tiny_network)),
        Measurement.model_validate(in_context_row(tiny_network)),
        Measurement.model_validate(layer_row()),
        Measurement.model_validate(
            layer_row(
                "isolated-0002",
                status="failed",
                error="RuntimeError: boom",
                median_ms=None,
                p10_ms=None,
                p90_ms=None,
                repetitions=None,
            )
        ),
    ]
    batch = ProfileBatch.build("batch-key-1", context, rows)
    assert len(batch.network_measurements) == 2 and len(batch.layer_measurements) == 2
    text = batch.to_json()
    again = ProfileBatch.from_json(text)
    assert again == batch
    assert again.network_measurements[0].architecture == tiny_network
    assert again.network_measurements[0].architecture.content_hash == tiny_network.content_hash
    assert json.loads(text)["device"]["backend"] == "torch-cpu"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"median_ms": -1.0, "p10_ms": -2.0}, "positive finite"),
        ({"median_ms": math.nan}, "median_ms\n.*finite number"),
        ({"p90_ms": math.inf}, "p90_ms\n.*finite number"),
        ({"median_ms": 0.0, "p10_ms": 0.0}, "positive finite"),
        ({"p10_ms": 1.1}, "percentiles out of order"),
        ({"p90_ms": 0.95}, "percentiles out of order"),
        ({"repetitions": None}, "repetition count"),
        ({"sample_key": "short"}, "at least 8 characters"),
        ({"sample_key": "x" * 129}, "at most 128 characters"),
        ({"sample_key": "has spaces in it"}, "pattern"),
        ({"status": "failed"}, "needs an error message"),
        ({"error": "why"}, "cannot carry an error"),
        ({"architecture": None}, "needs its architecture"),
        ({"cv": -0.1}, "greater than or equal to 0"),
        ({"probe_ms": 1.2}, "come together or not at all"),
        ({"probe_ms": 1.2, "relative_latency": 0.8}, "come together or not at all"),
        ({"probe_ms": 0.0, "relative_latency": 0.8, "probe_version": 1}, "greater than 0"),
    ],
)
def test_bad_rows_are_rejected(tiny_network: Network, overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        Measurement.model_validate(network_row(tiny_network, **overrides))


FLOAT_FIELDS = sorted(
    name for name, field in Measurement.model_fields.items() if field.annotation in (float, float | None)
)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_no_float_of_a_row_may_be_nan_or_infinite(tiny_network: Network, field: str, value: float) -> None:
    # A failed row too: its timings are not checked against each other, but they are stored as JSON.
    failed = network_row(tiny_network, status="failed", error="RuntimeError: boom", **{field: value})
    with pytest.raises(ValidationError) as info:
        Measurement.model_validate(failed)
    assert [(error["loc"], error["type"]) for error in info.value.errors()] == [((field,), "finite_number")]
    per_layer = [{"layer": "conv", "ms": value}]
    with pytest.raises(ValidationError, match="per_layer.0.ms\n.*finite number"):
        Measurement.model_validate(network_row(tiny_network, per_layer=per_layer))


def test_the_float_fields_cover_every_timing() -> None:
    assert {"median_ms", "p10_ms", "p90_ms", "mean_ms", "cv", "residual_ms", "probe_ms"} <= set(FLOAT_FIELDS)


def test_a_batch_names_a_non_finite_number_in_its_environment(
    tiny_network: Network, context: RunContext
) -> None:
    row = Measurement.model_validate(network_row(tiny_network))
    data = json.loads(ProfileBatch.build("batch-key-1", context, [row]).to_json())
    data["environment"]["backend_settings"] = {"threads": 1, "clocks": {"boost": [3.2, math.nan]}}
    with pytest.raises(InvalidBatch) as info:
        ProfileBatch.from_json(json.dumps(data))
    [error] = info.value.details["errors"]
    assert error["field"] == "environment.backend_settings.clocks"
    assert "boost.1 is not a finite number" in error["message"]
    data["environment"]["backend_settings"] = {}
    data["environment"]["gpu_temperature"] = math.inf  # an extra key
    with pytest.raises(InvalidBatch, match="environment.gpu_temperature"):
        ProfileBatch.from_json(json.dumps(data))


@pytest.mark.parametrize("field", ["warmup_ms", "min_repeat_ms", "max_seconds", "min_sample_ms"])
def test_a_batch_names_a_non_finite_number_in_its_protocol(
    tiny_network: Network, context: RunContext, field: str
) -> None:
    row = Measurement.model_validate(network_row(tiny_network))
    data = json.loads(ProfileBatch.build("batch-key-1", context, [row]).to_json())
    data["protocol"][field] = math.inf
    with pytest.raises(InvalidBatch) as info:
        ProfileBatch.from_json(json.dumps(data))
    assert info.value.details["errors"][0]["field"] == f"protocol.{field}"


def test_in_context_rows_must_add_up(tiny_network: Network) -> None:
    row = in_context_row(tiny_network)
    row["residual_ms"] = row["residual_ms"] + 0.5
    with pytest.raises(ValidationError, match="layers_sum_ms \\+ residual_ms must equal median_ms"):
        Measurement.model_validate(row)
    row = in_context_row(tiny_network)
    row["per_layer"] = None
    with pytest.raises(ValidationError, match="needs per_layer"):
        Measurement.model_validate(row)


def test_batch_rejects_misplaced_duplicate_and_too_many_rows(
    tiny_network: Network, context: RunContext
) -> None:
    net = Measurement.model_validate(network_row(tiny_network))
    layer = Measurement.model_validate(layer_row())
    base = {"idempotency_key": "batch-key-1", **context.model_dump()}
    with pytest.raises(InvalidBatch, match="layer_measurements holds a network row"):
        ProfileBatch.parse_obj_checked({**base, "layer_measurements": [net]})
    with pytest.raises(InvalidBatch, match="sample keys repeat"):
        ProfileBatch.parse_obj_checked({**base, "network_measurements": [net, net]})
    with pytest.raises(InvalidBatch, match="1..500 measurements, got 0"):
        ProfileBatch.parse_obj_checked(base)
    many = [layer.model_copy(update={"sample_key": f"isolated-{i:06d}"}) for i in range(MAX_BATCH_ROWS + 1)]
    with pytest.raises(InvalidBatch, match="got 501"):
        ProfileBatch.parse_obj_checked({**base, "layer_measurements": many})
    with pytest.raises(InvalidBatch, match="idempotency_key"):
        ProfileBatch.parse_obj_checked({**base, "idempotency_key": "k", "layer_measurements": [layer]})


def test_invalid_json_names_the_field(tiny_network: Network, context: RunContext) -> None:
    batch = ProfileBatch.build(
        "batch-key-1", context, [Measurement.model_validate(network_row(tiny_network))]
    )
    data = json.loads(batch.to_json())
    data["network_measurements"][0]["p10_ms"] = 5.0
    with pytest.raises(InvalidBatch) as info:
        ProfileBatch.from_json(json.dumps(data))
    assert info.value.details["errors"][0]["field"] == "network_measurements.0"
    assert "percentiles out of order" in str(info.value)
    assert MeasurementKind.NETWORK.value == "network"
