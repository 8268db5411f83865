"""Latency queries: one architecture, many width vectors of one architecture, or an ONNX upload."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.architectures import Architecture
from service.schemas.common import DeviceRef, PredictorRef

# A hard ceiling for the schema; the server's LPNET_MAX_WIDTH_VECTORS may be lower.
WIDTH_VECTORS_CEILING = 100_000


class LatencyRequest(BaseModel):
    """Predict one architecture's latency on a device."""

    model_config = ConfigDict(extra="forbid")

    device: DeviceRef
    architecture: Architecture


class LayerLatency(BaseModel):
    """Predicted time of one layer."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    op: str
    ms: float


class LatencyRead(BaseModel):
    """A predicted latency with its interval, per-layer times and extrapolation warnings."""

    device_id: int
    device: str
    predictor: PredictorRef
    network_name: str | None
    network_hash: str
    total_ms: float
    low_ms: float
    high_ms: float
    overhead_ms: float = Field(description="Framework overhead not attributed to any layer.")
    per_layer: list[LayerLatency]
    warnings: list[str] = Field(description="Non-empty when the prediction extrapolates.")


class BatchLatencyRequest(BaseModel):
    """Predict many width vectors (kept channels per group) of one architecture."""

    model_config = ConfigDict(extra="forbid")

    device: DeviceRef
    architecture: Architecture
    widths: list[list[int]] = Field(
        min_length=1,
        max_length=WIDTH_VECTORS_CEILING,
        description="Width vectors, one entry per channel group (see `group_channels` in the answer).",
    )


class BatchLatencyRead(BaseModel):
    """Predicted totals and intervals, one per width vector, in request order."""

    device_id: int
    device: str
    predictor: PredictorRef
    network_hash: str
    group_channels: list[int] = Field(description="Unpruned channels of each group: the full width vector.")
    count: int
    total_ms: list[float]
    low_ms: list[float]
    high_ms: list[float]
