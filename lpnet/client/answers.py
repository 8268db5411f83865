"""The server's answers as typed models, mirroring its response schemas.

Fields a newer server adds are kept (``extra="allow"``), so an older client still reads its answers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FINISHED_STATUSES = frozenset({"succeeded", "failed"})


class Answer(BaseModel):
    """Base of the parsed answers: fields a newer server adds are kept, not refused."""

    model_config = ConfigDict(extra="allow", frozen=True)


class PredictorRef(Answer):
    id: int
    version: int


class Allocator(Answer):
    """The allocator policy a device's latencies hold under.

    `environment` holds the variables that put a deployment's process under it (none for ``system``).
    """

    policy: str
    environment: dict[str, str] = Field(default_factory=dict)


class LayerLatency(Answer):
    name: str
    op: str
    ms: float


class Latency(Answer):
    """A predicted latency with its interval, per-layer times and extrapolation warnings."""

    device_id: int
    device: str
    allocator: Allocator | None = None
    predictor: PredictorRef
    network_name: str | None = None
    network_hash: str
    total_ms: float
    low_ms: float
    high_ms: float
    overhead_ms: float
    per_layer: list[LayerLatency]
    warnings: list[str] = Field(default_factory=list)
    plot_url: str | None = Field(
        default=None,
        description="The per-layer chart, when asked for with plot=True (`Client.latency_plot`).",
    )


class BatchLatency(Answer):
    """Predicted totals and intervals of many width vectors, in request order."""

    device_id: int
    device: str
    allocator: Allocator | None = None
    predictor: PredictorRef
    network_hash: str
    group_channels: list[int]
    count: int
    total_ms: list[float]
    low_ms: list[float]
    high_ms: list[float]


class DeviceStatus(Answer):
    phase: str
    percent: float | None = None
    eta_seconds: float | None = None
    message: str | None = None
    job_id: int | None = None
    updated_at: datetime | None = None


class PredictorSummary(Answer):
    id: int
    device_id: int
    version: int
    kind: str
    feature_schema_version: int
    metrics: dict[str, Any]
    training_fingerprint: str
    created_at: datetime


class Predictor(PredictorSummary):
    """A fitted predictor's metrics and versions."""

    device: str
    plot_url: str | None = None


class Device(Answer):
    """A registered device with its profiling counts, newest predictor and status."""

    id: int
    name: str
    hardware: str
    backend: str
    threads: int
    batch_size: int
    dtype: str
    allocator: str | None = None
    environment: dict[str, Any]
    is_local: bool
    created_at: datetime
    status: DeviceStatus
    profiling: dict[str, Any]
    predictor: PredictorSummary | None = None


class DeviceCreated(Device):
    """A device just registered, with its agent's key (shown in this answer only)."""

    agent_key: str
    agent_key_prefix: str


class ProfileSubmission(Answer):
    """The outcome of a submitted measurement batch."""

    batch_id: int
    device_id: int
    run_id: int
    idempotency_key: str
    received: dict[str, int]
    stored: dict[str, int]
    skipped: dict[str, int]
    failed_rows: int
    in_network_layers: int
    warnings: list[str] = Field(default_factory=list)
    replayed: bool = Field(default=False, description="The server answered a replay of this batch.")


class JobAccepted(Answer):
    """A queued job (a plan or a fit); poll it with `Client.plan` / `Client.job` or wait for it."""

    job_id: int
    kind: str
    status: str
    status_url: str


class _Finishing(Answer):
    id: int
    status: str
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


class Plan(_Finishing):
    """A plan: its status and progress, then its result (widths, per-layer ratios, latencies) or error."""

    device_id: int | None = None
    allocator: Allocator | None = None
    budget_ms: float
    options: dict[str, Any]
    created_at: datetime
    deadline_at: datetime | None = None
    finished_at: datetime | None = None


class Job(_Finishing):
    """A background job (fit or plan) as the jobs endpoint shows it."""

    kind: str
    device_id: int | None = None
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime | None = None
    finished_at: datetime | None = None


class Page(Answer):
    """One page of a list answer: its items, and the cursor of the next page (None on the last)."""

    items: list[dict[str, Any]]
    next_cursor: str | None = None


class ModelUpload(Answer):
    """Uploaded weights: name, checksum, size and the architecture they belong to."""

    id: int
    name: str
    sha256: str
    size_bytes: int
    architecture: dict[str, Any] | None = None
    created_at: datetime
