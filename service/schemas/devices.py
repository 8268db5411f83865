"""Device schemas: registration, and what a device looks like with its profiling and predictor state."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from profiler.environment import ALLOCATOR_ENVIRONMENT, AllocatorPolicy, FiniteJson
from service.schemas.common import NAME_PATTERN, RequestModel, not_an_id
from service.schemas.fits import PredictorMetrics

DevicePhase = Literal["registered", "profiling", "profiled", "fitting", "ready", "refining", "failed"]
ALLOCATOR_DESCRIPTION = (
    "The allocator policy the device's latencies hold under: retain (freed memory kept by the process; "
    "faster on memory-heavy networks, and more repeatable) or system (the C library's default). Run the "
    "deployment under the same policy."
)


class DeviceCreate(RequestModel):
    """What it takes to register a device.

    Hardware, backend, threads, batch size and dtype are checked by the profiler's `DeviceSpec`, the
    one place that knows which backends and dtypes exist.
    """

    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=NAME_PATTERN,
        description="Unique name; not all digits, since URLs accept a device's id or its name.",
        examples=["laptop-1t"],
    )
    hardware: str = Field(min_length=1, max_length=200, description="e.g. the CPU model")
    backend: str = Field(default="torch-cpu", max_length=64)
    threads: int = 1
    batch_size: int = 1
    dtype: str = Field(default="float32", max_length=16)
    allocator: AllocatorPolicy = Field(default=AllocatorPolicy.RETAIN, description=ALLOCATOR_DESCRIPTION)
    environment: dict[str, FiniteJson] = Field(
        default_factory=dict, description="The machine's fingerprint; numbers in it must be finite."
    )
    is_local: bool = False

    @field_validator("name")
    @classmethod
    def _not_a_number(cls, value: str) -> str:
        return not_an_id(value)

    @model_validator(mode="after")
    def _valid_device_spec(self) -> DeviceCreate:
        # Imported here: the profiler package pulls in torch, which the rest of the CLI does not need.
        from profiler.device import DeviceSpec

        # InvalidDeviceSpec is a ValueError, so pydantic reports it as a validation error.
        DeviceSpec(
            hardware=self.hardware,
            backend=self.backend,
            threads=self.threads,
            batch_size=self.batch_size,
            dtype=self.dtype,
        )
        return self


class AllocatorRead(BaseModel):
    """The allocator policy a latency holds under, and how to run a deployment under it."""

    policy: AllocatorPolicy = Field(description=ALLOCATOR_DESCRIPTION)
    environment: dict[str, str] = Field(
        description="Environment variables that put any process under the policy when set before it starts "
        "(glibc); none for system, which is what a process gets without them."
    )

    @classmethod
    def of(cls, policy: str) -> AllocatorRead:
        """The answer for a device's policy."""
        known = AllocatorPolicy(policy)
        return cls(policy=known, environment=dict(ALLOCATOR_ENVIRONMENT[known]))


class DeviceStatus(BaseModel):
    """Where a device stands: registered, being profiled or fitted (with progress), ready, or ready and
    being refined in the background (with progress)."""

    phase: DevicePhase
    percent: float | None = Field(default=None, ge=0, le=100, description="Progress of the phase.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated seconds left.")
    message: str | None = None
    job_id: int | None = Field(default=None, description="The job doing the work, if any.")
    updated_at: datetime | None = None
    predictor_version: int | None = Field(
        default=None, description="The predictor version latency answers use now, once there is one."
    )
    refined: bool | None = Field(
        default=None,
        description="Whether the first run's background refining of this device is done: false while it "
        "refines (or after a failed round, which the next start resumes), true once its last round stored "
        "a predictor; null on devices it does not refine.",
    )


class StatusCounts(BaseModel):
    """Measurements by outcome."""

    ok: int = 0
    failed: int = 0


class ProfilingCounts(BaseModel):
    """How much has been measured on a device."""

    network: StatusCounts = Field(default_factory=StatusCounts, description="Whole networks.")
    isolated: StatusCounts = Field(default_factory=StatusCounts, description="Layers timed alone.")
    in_network: StatusCounts = Field(
        default_factory=StatusCounts, description="Layers timed inside a network forward."
    )
    last_measured_at: datetime | None = None


class PredictorSummary(BaseModel):
    """A fitted predictor, without its artifact."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    device_id: int
    version: int
    kind: str
    feature_schema_version: int
    metrics: PredictorMetrics = Field(
        description="Accuracy on held-out networks beside the baselines; an imported predictor has what its "
        "artifact brought."
    )
    training_fingerprint: str
    created_at: datetime


class DeviceRead(BaseModel):
    """A registered device, its profiling counts, its current predictor and its status."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    hardware: str
    backend: str
    threads: int
    batch_size: int
    dtype: str
    allocator: AllocatorPolicy = Field(description=ALLOCATOR_DESCRIPTION)
    environment: dict[str, Any]
    is_local: bool
    created_at: datetime
    status: DeviceStatus
    profiling: ProfilingCounts
    predictor: PredictorSummary | None = Field(description="The newest predictor version, if any.")


class DeviceCreated(DeviceRead):
    """A device just registered, with the API key its agent submits measurements with."""

    agent_key: str = Field(description="Shown once: only its hash is stored.")
    agent_key_prefix: str
