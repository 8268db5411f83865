"""The wire format of measurements, shared by the profiler and the service.

A `ProfileBatch` is what a device agent posts to `/v1/devices/{id}/profiles`: the device spec,
environment and timing protocol once, then up to `MAX_BATCH_ROWS` measurements. The same
`Measurement` rows are written to JSONL files and handed to database sinks.

Every number of the format is finite: rows and batches are stored as JSON, which has no NaN or
infinity, so a NaN or infinite float is refused where it stands (pydantic's ``allow_inf_nan=False``).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lpnet.arch.ir import Layer, Network
from profiler.device import DeviceSpec
from profiler.environment import Environment
from profiler.errors import InvalidBatch
from profiler.protocol import TimingProtocol

SCHEMA_VERSION = 1
MAX_BATCH_ROWS = 500
MAX_ERROR_CHARS = 4000
KEY_PATTERN = r"^[A-Za-z0-9._:-]+$"

SampleKey = Annotated[str, Field(min_length=8, max_length=128, pattern=KEY_PATTERN)]
IdempotencyKey = Annotated[str, Field(min_length=8, max_length=128, pattern=KEY_PATTERN)]


class MeasurementKind(StrEnum):
    """What was timed."""

    NETWORK = "network"  # one whole forward of a network
    IN_CONTEXT = "in_context"  # a whole forward plus every layer timed inside it
    ISOLATED = "isolated"  # a single layer built and run on its own


NETWORK_KINDS = frozenset({MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT})


class WireModel(BaseModel):
    """Base of the format's models: immutable, no unknown fields, finite numbers only."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LayerTime(WireModel):
    """Median time of one layer inside a real forward."""

    layer: str = Field(min_length=1, max_length=200)
    ms: float = Field(ge=0)


class Measurement(WireModel):
    """One timed configuration (or one that failed to run)."""

    sample_key: SampleKey
    kind: MeasurementKind
    status: Literal["ok", "failed"] = "ok"
    error: str | None = Field(default=None, max_length=MAX_ERROR_CHARS)
    family: str | None = Field(default=None, max_length=100)
    architecture: Network | None = None
    layer: Layer | None = None
    width_vector: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, max_length=10_000)
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    cv: float | None = Field(default=None, ge=0)
    repetitions: int | None = Field(default=None, ge=1)
    precision: float | None = Field(default=None, ge=0)
    precision_reached: bool | None = None
    per_layer: list[LayerTime] | None = Field(default=None, max_length=10_000)
    layers_sum_ms: float | None = Field(default=None, ge=0)
    residual_ms: float | None = None
    load_average_1m: float | None = Field(default=None, ge=0)  # a busy machine times slow
    # With a speed probe (profiler.speed): the median probe forward around the samples, and the
    # median of sample / probe, the latency in probe forwards, which repeats better on a shared CPU.
    probe_ms: float | None = Field(default=None, gt=0)
    relative_latency: float | None = Field(default=None, gt=0)
    probe_version: int | None = Field(default=None, ge=1)
    measured_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    duration_s: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check_consistency(self) -> Measurement:
        if self.kind in NETWORK_KINDS and self.architecture is None:
            raise ValueError(f"a {self.kind.value} measurement needs its architecture")
        if self.kind is MeasurementKind.ISOLATED and self.layer is None:
            raise ValueError("an isolated measurement needs its layer config")
        if self.status == "failed":
            if not self.error:
                raise ValueError("a failed measurement needs an error message")
            return self
        if self.error:
            raise ValueError("an ok measurement cannot carry an error")
        probed = (
            self.probe_ms is not None,
            self.relative_latency is not None,
            self.probe_version is not None,
        )
        if any(probed) and not all(probed):
            raise ValueError("probe_ms, relative_latency and probe_version come together or not at all")
        p10, median, p90 = self.p10_ms, self.median_ms, self.p90_ms
        if p10 is None or median is None or p90 is None:
            raise ValueError("an ok measurement needs p10_ms, median_ms and p90_ms")
        for name, value in (
            ("median_ms", median),
            ("p10_ms", p10),
            ("p90_ms", p90),
            ("mean_ms", self.mean_ms),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be a positive finite number of milliseconds")
        if not p10 <= median <= p90:
            raise ValueError(f"percentiles out of order: p10_ms={p10}, median_ms={median}, p90_ms={p90}")
        if self.repetitions is None:
            raise ValueError("an ok measurement needs its repetition count")
        if self.kind is MeasurementKind.IN_CONTEXT:
            if not self.per_layer or self.layers_sum_ms is None or self.residual_ms is None:
                raise ValueError("an in_context measurement needs per_layer, layers_sum_ms and residual_ms")
            total = sum(t.ms for t in self.per_layer)
            if not math.isclose(total, self.layers_sum_ms, rel_tol=1e-6, abs_tol=1e-6):
                raise ValueError(f"layers_sum_ms={self.layers_sum_ms} differs from the per-layer sum {total}")
            if not math.isclose(self.layers_sum_ms + self.residual_ms, median, rel_tol=1e-6, abs_tol=1e-6):
                raise ValueError("layers_sum_ms + residual_ms must equal median_ms")
        return self


class RunContext(WireModel):
    """Everything a batch states once: the device, the machine and the timing protocol."""

    device: DeviceSpec
    environment: Environment
    protocol: TimingProtocol


class ProfileBatch(WireModel):
    """Up to `MAX_BATCH_ROWS` measurements from one device, posted under one idempotency key."""

    schema_version: Literal[1] = 1
    idempotency_key: IdempotencyKey
    device: DeviceSpec
    environment: Environment
    protocol: TimingProtocol
    network_measurements: list[Measurement] = Field(default_factory=list)
    layer_measurements: list[Measurement] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_rows(self) -> ProfileBatch:
        rows = len(self.network_measurements) + len(self.layer_measurements)
        if not 1 <= rows <= MAX_BATCH_ROWS:
            raise ValueError(f"a batch holds 1..{MAX_BATCH_ROWS} measurements, got {rows}")
        for m in self.network_measurements:
            if m.kind not in NETWORK_KINDS:
                raise ValueError(f"network_measurements holds a {m.kind.value} row ({m.sample_key})")
        for m in self.layer_measurements:
            if m.kind is not MeasurementKind.ISOLATED:
                raise ValueError(f"layer_measurements holds a {m.kind.value} row ({m.sample_key})")
        keys = [m.sample_key for m in self.measurements]
        if len(set(keys)) != len(keys):
            raise ValueError("sample keys repeat within the batch")
        return self

    @property
    def measurements(self) -> list[Measurement]:
        return [*self.network_measurements, *self.layer_measurements]

    @property
    def context(self) -> RunContext:
        return RunContext(device=self.device, environment=self.environment, protocol=self.protocol)

    @classmethod
    def build(
        cls, idempotency_key: str, context: RunContext, measurements: list[Measurement]
    ) -> ProfileBatch:
        """Split `measurements` into the network and layer lists of a validated batch."""
        return cls.parse_obj_checked(
            {
                "idempotency_key": idempotency_key,
                "device": context.device,
                "environment": context.environment,
                "protocol": context.protocol,
                "network_measurements": [m for m in measurements if m.kind in NETWORK_KINDS],
                "layer_measurements": [m for m in measurements if m.kind is MeasurementKind.ISOLATED],
            }
        )

    @classmethod
    def parse_obj_checked(cls, data: object) -> ProfileBatch:
        """Validate a dict (or model fields); raises InvalidBatch naming the bad fields."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidBatch.from_validation_error(exc) from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> ProfileBatch:
        """Parse and validate a JSON document; raises InvalidBatch naming the bad fields."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise InvalidBatch.from_validation_error(exc) from exc

    def to_json(self) -> str:
        return self.model_dump_json()
