"""ORM models of the service: devices, measurements, predictors, jobs, API keys, uploaded models, the
tasks of device agents and the latency charts kept for a while.

Enumerated string columns carry CHECK constraints built from the `StrEnum`s below (and the profiler's
`AllocatorPolicy`), so the database rejects a value the code does not know, on SQLite and PostgreSQL
alike.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from profiler.environment import AllocatorPolicy
from service.db.base import Base, utcnow

# Lengths of hex sha256 digests (architecture hashes, key hashes, weight checksums).
SHA256_HEX_LENGTH = 64


class RunSource(StrEnum):
    """Where a profile run was measured."""

    LOCAL = "local"
    AGENT = "agent"


class RunStatus(StrEnum):
    """Life cycle of a profile run."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class MeasurementContext(StrEnum):
    """Whether a layer was timed alone or inside its network."""

    ISOLATED = "isolated"
    IN_NETWORK = "in_network"


class MeasurementStatus(StrEnum):
    """Outcome of one measurement."""

    OK = "ok"
    FAILED = "failed"


class JobStatus(StrEnum):
    """Life cycle of a background job."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class KeyScope(StrEnum):
    """What an API key may do: admin everything, agent submit profiles for its device, reader read."""

    ADMIN = "admin"
    AGENT = "agent"
    READER = "reader"


def _one_of(column: str, values: type[StrEnum]) -> str:
    """SQL condition that `column` holds one of the enum's values."""
    quoted = ", ".join(f"'{member.value}'" for member in values)
    return f"{column} IN ({quoted})"


class Device(Base):
    """A target on which latency is measured and predicted: hardware, backend settings, allocator policy."""

    __tablename__ = "device"
    __table_args__ = (
        CheckConstraint("threads >= 1", name="threads_positive"),
        CheckConstraint("batch_size >= 1", name="batch_size_positive"),
        CheckConstraint(_one_of("allocator", AllocatorPolicy), name="allocator_valid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    hardware: Mapped[str] = mapped_column(String(256))
    backend: Mapped[str] = mapped_column(String(64))
    threads: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16), default="float32")
    # Every measurement of the device is taken under this policy (profiler.environment.AllocatorPolicy);
    # retain, the profiler's default, unless registered otherwise.
    allocator: Mapped[str] = mapped_column(
        String(16), default=AllocatorPolicy.RETAIN.value, server_default=AllocatorPolicy.RETAIN.value
    )
    # Fingerprint of the machine: cpu model, cores, os, library versions.
    environment: Mapped[dict[str, Any]] = mapped_column(default=dict)
    is_local: Mapped[bool] = mapped_column(default=False, server_default=false())
    # Progress of background work on this device (phase, percent, eta), shown by `device list`.
    status: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProfileRun(Base):
    """One profiling session on a device, local or submitted by an agent."""

    __tablename__ = "profile_run"
    __table_args__ = (
        CheckConstraint(_one_of("source", RunSource), name="source_valid"),
        CheckConstraint(_one_of("status", RunStatus), name="status_valid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.RUNNING)
    # Timing protocol (warm-up, repetitions, processes) so runs stay comparable.
    protocol: Mapped[dict[str, Any]] = mapped_column(default=dict)
    environment: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    summary: Mapped[dict[str, Any] | None] = mapped_column(default=None)

    device: Mapped[Device] = relationship()


class ProfileBatch(Base):
    """An agent submission, remembered so that a retried POST with the same key is not stored twice."""

    __tablename__ = "profile_batch"
    __table_args__ = (UniqueConstraint("device_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    idempotency_key: Mapped[str] = mapped_column(String(128))
    run_id: Mapped[int] = mapped_column(ForeignKey("profile_run.id", ondelete="CASCADE"), index=True)
    row_count: Mapped[int] = mapped_column(Integer)
    # The response the first submission got; a replay answers with it unchanged.
    response: Mapped[dict[str, Any]] = mapped_column()
    # sha256 of the batch's canonical JSON: the same key with another body is refused, not replayed.
    # NULL on batches stored before the hash was kept: their key replays whatever body comes.
    body_sha256: Mapped[str | None] = mapped_column(String(SHA256_HEX_LENGTH), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LayerMeasurement(Base):
    """Latency of one layer configuration, timed alone or inside a network."""

    __tablename__ = "layer_measurement"
    __table_args__ = (
        # sample_key identifies what was measured, so a rerun can skip samples already stored.
        UniqueConstraint("device_id", "sample_key"),
        CheckConstraint(_one_of("context", MeasurementContext), name="context_valid"),
        CheckConstraint(_one_of("status", MeasurementStatus), name="status_valid"),
        CheckConstraint("status <> 'ok' OR median_ms IS NOT NULL", name="ok_has_latency"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("profile_run.id", ondelete="CASCADE"), index=True)
    sample_key: Mapped[str] = mapped_column(String(256))
    context: Mapped[str] = mapped_column(String(16))
    layer_config: Mapped[dict[str, Any]] = mapped_column()
    layer_name: Mapped[str | None] = mapped_column(String(256), default=None)
    network_hash: Mapped[str | None] = mapped_column(String(SHA256_HEX_LENGTH), default=None, index=True)
    median_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p10_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p90_ms: Mapped[float | None] = mapped_column(Float, default=None)
    cv: Mapped[float | None] = mapped_column(Float, default=None)
    repetitions: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default=MeasurementStatus.OK)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NetworkMeasurement(Base):
    """Latency of a whole network, optionally with the per-layer split measured in the same run."""

    __tablename__ = "network_measurement"
    __table_args__ = (
        UniqueConstraint("device_id", "sample_key"),
        CheckConstraint(_one_of("status", MeasurementStatus), name="status_valid"),
        CheckConstraint("status <> 'ok' OR median_ms IS NOT NULL", name="ok_has_latency"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("profile_run.id", ondelete="CASCADE"), index=True)
    sample_key: Mapped[str] = mapped_column(String(256))
    architecture: Mapped[dict[str, Any]] = mapped_column()
    arch_hash: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH), index=True)
    family: Mapped[str | None] = mapped_column(String(64), default=None)
    width_vector: Mapped[list[int] | None] = mapped_column(JSON(none_as_null=True), default=None)
    median_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p10_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p90_ms: Mapped[float | None] = mapped_column(Float, default=None)
    cv: Mapped[float | None] = mapped_column(Float, default=None)
    repetitions: Mapped[int] = mapped_column(Integer, default=0)
    # [{"layer": name, "ms": latency}, ...] when layers were timed inside this network.
    per_layer: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True), default=None)
    # Whole-network latency minus the sum of per_layer: the overhead the DESIGN notes measure.
    residual_ms: Mapped[float | None] = mapped_column(Float, default=None)
    # With the speed probe (profiler.speed): its median time around the samples, and the latency
    # as a median ratio to it, which repeats better than milliseconds on a shared CPU.
    probe_ms: Mapped[float | None] = mapped_column(Float, default=None)
    relative_latency: Mapped[float | None] = mapped_column(Float, default=None)
    probe_version: Mapped[int | None] = mapped_column(Integer, default=None)
    status: Mapped[str] = mapped_column(String(16), default=MeasurementStatus.OK)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Predictor(Base):
    """A fitted latency predictor for one device; versions count up per device."""

    __tablename__ = "predictor"
    __table_args__ = (UniqueConstraint("device_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    # safetensors bytes; never a pickle, so artifacts load across library versions. Deferred: listing
    # predictors must not read megabytes of tensors.
    artifact: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    feature_schema_version: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Hash of the training data and settings, to tell whether a refit would change anything.
    training_fingerprint: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Predicted-vs-measured scatter plot of the fit (PNG), shown at /v1/predictors/{id}/plot.png.
    plot_png: Mapped[bytes | None] = mapped_column(LargeBinary, default=None, deferred=True)

    device: Mapped[Device] = relationship()


class Job(Base):
    """Background work (profile, fit, plan, ...) leased by workers, retried up to `max_attempts`.

    A running job without a lease owner is deferred: it waits for something outside the service (a
    device's agent) and is claimed again once `not_before` has passed. `deadline_at` bounds the job from
    being queued to its end; `key_id` is the API key that requested it (for per-key quotas).
    """

    __tablename__ = "job"
    __table_args__ = (
        CheckConstraint(_one_of("status", JobStatus), name="status_valid"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        # Workers pick the oldest queued job.
        Index("ix_job_status_created_at", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    device_id: Mapped[int | None] = mapped_column(
        ForeignKey("device.id", ondelete="SET NULL"), default=None, index=True
    )
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    input: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    progress: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default=text("3"))
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_key.id", ondelete="SET NULL"), default=None, index=True
    )
    deadline_at: Mapped[datetime | None] = mapped_column(default=None)
    not_before: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    device: Mapped[Device | None] = relationship()


class ApiKey(Base):
    """An API key, stored only as its sha256; the prefix lets people tell keys apart and revoke them."""

    __tablename__ = "api_key"
    __table_args__ = (
        CheckConstraint(_one_of("scope", KeyScope), name="scope_valid"),
        # An agent submits measurements for exactly one device.
        CheckConstraint("scope <> 'agent' OR device_id IS NOT NULL", name="agent_has_device"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    device_id: Mapped[int | None] = mapped_column(
        ForeignKey("device.id", ondelete="CASCADE"), default=None, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    device: Mapped[Device | None] = relationship()


class ModelUpload(Base):
    """A network a client uploaded: its architecture IR and safetensors weights."""

    __tablename__ = "model_upload"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    architecture: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # Deferred: reading an upload's metadata must not read its (possibly 100 MB) weights.
    weights: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LatencyPlot(Base):
    """A per-layer latency chart (PNG) rendered for a latency query that asked for one.

    Only the key that asked (and admin keys) may read it, until it is older than
    LPNET_LATENCY_PLOT_TTL_SECONDS; expired plots are deleted whenever a new one is stored.
    """

    __tablename__ = "latency_plot"

    # A uuid4 in hex: the chart's URL cannot be guessed from another one.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_key.id", ondelete="CASCADE"), index=True)
    png: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class TaskKind(StrEnum):
    """What a device agent is asked to do."""

    PROFILE_CAMPAIGN = "profile_campaign"  # measure samples of model families, optionally fit afterwards
    VERIFY = "verify"  # measure one whole network for a plan job


class TaskStatus(StrEnum):
    """Life cycle of an agent task."""

    QUEUED = "queued"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AgentTask(Base):
    """Work for the agent of a remote device, leased like a job: owner (agent id) + expiry.

    A lapsed lease puts the task back in the queue on the next lease call, up to `max_attempts`
    leases; then it fails with the reason. A verify task belongs to the plan job waiting for it.
    """

    __tablename__ = "agent_task"
    __table_args__ = (
        CheckConstraint(_one_of("kind", TaskKind), name="kind_valid"),
        CheckConstraint(_one_of("status", TaskStatus), name="status_valid"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        CheckConstraint("status <> 'leased' OR lease_owner IS NOT NULL", name="leased_has_owner"),
        # Agents lease the oldest queued task of their device.
        Index("ix_agent_task_device_id_status_created_at", "device_id", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.QUEUED)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # sha256 of the agent's result as first accepted: a repeated completion must match it.
    result_digest: Mapped[str | None] = mapped_column(String(SHA256_HEX_LENGTH), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    progress: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The plan job a verify task measures for.
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("job.id", ondelete="SET NULL"), default=None, index=True
    )
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default=text("3"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    device: Mapped[Device] = relationship()
