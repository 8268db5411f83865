"""Latency queries: one architecture, many width vectors of one architecture, or an ONNX upload."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from lpnet.arch.ir import MAX_LAYERS
from service.schemas.architectures import Architecture
from service.schemas.common import DeviceRef, PredictorRef, RequestModel
from service.schemas.devices import AllocatorRead

# A hard ceiling for the schema; the server's LPNET_MAX_WIDTH_VECTORS may be lower.
WIDTH_VECTORS_CEILING = 100_000
# A network has fewer channel groups than layers. The entries are checked against the groups by the
# latency service, in one vectorised pass rather than one validator call per entry.
WidthVector = Annotated[list[int], Field(max_length=MAX_LAYERS)]
# A latency plot's id: a uuid4 in hex.
PLOT_ID_PATTERN = r"^[0-9a-f]{32}$"


class LatencyRequest(RequestModel):
    """Predict one architecture's latency on a device."""

    device: DeviceRef
    architecture: Architecture
    plot: bool = Field(
        default=False,
        description="Also render a per-layer bar chart; the answer's plot_url serves it to this key for "
        "LPNET_LATENCY_PLOT_TTL_SECONDS (24 h by default).",
    )


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
    allocator: AllocatorRead
    predictor: PredictorRef
    network_name: str | None
    network_hash: str
    total_ms: float
    low_ms: float
    high_ms: float
    overhead_ms: float = Field(description="Framework overhead not attributed to any layer.")
    per_layer: list[LayerLatency]
    warnings: list[str] = Field(description="Non-empty when the prediction extrapolates.")
    plot_url: str | None = Field(
        default=None,
        description="The per-layer bar chart (PNG) when the request asked for `plot`, readable with the "
        "same API key until it expires; null otherwise.",
    )


class BatchLatencyRequest(RequestModel):
    """Predict many width vectors (kept channels per group) of one architecture."""

    device: DeviceRef
    architecture: Architecture
    widths: list[WidthVector] = Field(
        min_length=1,
        max_length=WIDTH_VECTORS_CEILING,
        description="Width vectors, one entry per channel group (see `group_channels` in the answer).",
    )


class BatchLatencyRead(BaseModel):
    """Predicted totals and intervals, one per width vector, in request order."""

    device_id: int
    device: str
    allocator: AllocatorRead
    predictor: PredictorRef
    network_hash: str
    group_channels: list[int] = Field(description="Unpruned channels of each group: the full width vector.")
    count: int
    total_ms: list[float]
    low_ms: list[float]
    high_ms: list[float]
