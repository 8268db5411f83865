"""Device agents and their tasks: hello, lease, heartbeat, complete, fail; profile campaigns."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from profiler.environment import AllocatorPolicy, Environment, FiniteJson
from profiler.family_names import describe_special_families
from profiler.protocol import TimingProtocol
from service.db.models import TaskKind, TaskStatus
from service.schemas.common import FIRST_RUN_FAMILIES, DeviceRef, RequestModel
from service.schemas.documents import LenientDocument, SchemaOf, StoredDocument, document_of_kind
from service.schemas.plan_results import NetworkDocument

AgentId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:@-]+$",
        description="The agent's own stable name (kept in its state directory); leases are held by it.",
        examples=["edge-box-1:3f9a0c2d11e4"],
    ),
]
FamilyName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
KindName = Literal["network", "in_context", "isolated"]
ALL_KINDS: tuple[KindName, ...] = ("network", "in_context", "isolated")
LeaseSeconds = Annotated[float, Field(ge=1, le=3600, description="Lease length asked for, in seconds.")]
SampleCount = Annotated[int, Field(ge=0, le=100_000)]
# Progress and results are small JSON documents; a bound keeps a confused agent from filling the table.
MAX_DOCUMENT_CHARS = 16_384


def _bounded_document(value: dict[str, Any] | None, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    text = json.dumps(value, allow_nan=False, default=str)
    if len(text) > MAX_DOCUMENT_CHARS:
        raise ValueError(f"{what} is {len(text)} characters of JSON; at most {MAX_DOCUMENT_CHARS} allowed")
    return value


class CampaignCreate(RequestModel):
    """A profile campaign for a remote device's agent: which families to sample, and how much."""

    families: list[FamilyName] = Field(
        default_factory=lambda: list(FIRST_RUN_FAMILIES),
        min_length=1,
        max_length=32,
        description="Families measured: torchvision classification models (their width variants), "
        f"{describe_special_families('`')}.",
    )
    kinds: list[KindName] = Field(default_factory=lambda: list(ALL_KINDS), min_length=1, max_length=3)
    image_size: int = Field(default=224, ge=16, le=1024, description="Input height and width.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Sampling seed.")
    budget_minutes: float | None = Field(
        default=None, gt=0, le=7 * 24 * 60, description="Measuring time; unset: until the counts are done."
    )
    network_samples: SampleCount | None = Field(default=None, description="Width vectors per family.")
    in_context_samples: SampleCount | None = Field(
        default=None, description="In-context networks per family."
    )
    isolated_samples: SampleCount | None = Field(default=None, description="Isolated layers per family.")
    quick: bool = Field(default=False, description="A loose timing protocol, for smoke runs only.")
    fit_after: bool = Field(default=False, description="Queue a predictor fit once the campaign succeeds.")

    @field_validator("families", "kinds")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names repeat")
        return value


class AgentHello(RequestModel):
    """An agent announcing itself: its id and the machine it runs on."""

    agent_id: AgentId
    device: DeviceRef | None = Field(
        default=None, description="Needed with an admin key; an agent key's device is the key's own."
    )
    environment: Environment = Field(description="The machine's fingerprint, stored on the device.")
    profile_minutes: float | None = Field(
        default=None,
        gt=0,
        le=7 * 24 * 60,
        description="Queue a campaign of this many minutes (with a fit after it) if the device has no "
        "predictor, no open campaign and no fit on the way.",
    )


class AgentDeviceRead(BaseModel):
    """The device an agent measures, with the settings it must measure with."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    hardware: str
    backend: str
    threads: int
    batch_size: int
    dtype: str
    allocator: AllocatorPolicy = Field(description="The allocator policy every measurement is taken under.")
    is_local: bool


# What a task holds: its payload, the agent's progress and its result, by task kind ----------------------


class CampaignPayload(LenientDocument, CampaignCreate):
    """A profile campaign's payload: the campaign as it was queued."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=True)


class VerifyPayload(StoredDocument):
    """A verify task's payload: the network to measure for a plan, and how to time it.

    The server always queues both the network and its hash; they are optional here so that a payload
    missing one is still answered as stored (its agent then fails the task, naming what is missing).
    """

    architecture: NetworkDocument | None = Field(
        default=None, description="The pruned network, in the JSON IR."
    )
    network_hash: str | None = Field(default=None, description="Its content_hash; the result must name it.")
    protocol: Annotated[dict[str, Any], SchemaOf(TimingProtocol)] | None = Field(
        default=None, description="The timing protocol to measure with."
    )


class HeartbeatProgress(RequestModel):
    """How far an agent got with its task, sent with a heartbeat; agents may add keys of their own.

    A campaign reports its counts over all its leases (measured, failed, elapsed_seconds) and, once it
    can tell, percent and eta_seconds; a verify task reports phase measuring and the network's hash.
    A named key whose value does not fit is refused; any other key may hold JSON with finite numbers.
    """

    model_config = ConfigDict(extra="allow")

    __pydantic_extra__: dict[str, FiniteJson] = Field(init=False)

    phase: str | None = Field(
        default=None, min_length=1, max_length=64, description="What the agent does, e.g. measuring."
    )
    percent: float | None = Field(default=None, ge=0, le=100, description="Share done, 0 to 100.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated seconds left.")
    measured: int | None = Field(default=None, ge=0, description="Samples measured so far.")
    failed: int | None = Field(default=None, ge=0, description="Of those, configurations that failed to run.")
    elapsed_seconds: float | None = Field(default=None, ge=0, description="Measuring time so far.")
    network_hash: str | None = Field(
        default=None, min_length=64, max_length=64, description="content_hash of the network being measured."
    )

    def as_json(self) -> dict[str, Any]:
        """The keys the agent sent, as stored: a key it left out stays out."""
        return self.model_dump(mode="json", exclude_unset=True)


class AgentTaskProgress(LenientDocument, HeartbeatProgress):
    """What an agent reported with its last heartbeat, as stored."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=True)


class VerifyResult(RequestModel):
    """What an agent measured for a verify task."""

    measured_ms: float = Field(gt=0, description="Median latency of the whole network.")
    p10_ms: float | None = Field(default=None, gt=0)
    p90_ms: float | None = Field(default=None, gt=0)
    repetitions: int | None = Field(default=None, ge=1)
    network_hash: str = Field(min_length=64, max_length=64, description="content_hash of what was measured.")
    probe_ms: float | None = Field(default=None, gt=0, description="Speed probe's median around the samples.")
    relative_latency: float | None = Field(default=None, gt=0, description="Median of sample / probe.")
    probe_version: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _probe_fields_together(self) -> VerifyResult:
        given = [self.probe_ms is not None, self.relative_latency is not None, self.probe_version is not None]
        if any(given) and not all(given):
            raise ValueError("probe_ms, relative_latency and probe_version go together: give all or none")
        return self


class CampaignResult(RequestModel):
    """What an agent reports at the end of a profile campaign (the measurements went as profile batches)."""

    measured: int = Field(ge=0, description="Samples measured for this campaign, over all its leases.")
    failed: int = Field(default=0, ge=0, description="Of those, configurations that failed to run.")
    skipped: int = Field(default=0, ge=0, description="Samples the device had already.")
    seconds: float = Field(default=0.0, ge=0, description="Measuring time over all leases.")
    rejected_batches: int = Field(default=0, ge=0, description="Batches the server refused.")


class VerifyResultRead(LenientDocument, VerifyResult):
    """What an agent measured for a verify task, as stored."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=True)


class CampaignFit(StoredDocument):
    """Whether the fit a campaign asked for (fit_after) was queued once it succeeded."""

    queued: bool
    job_id: int | None = Field(
        default=None, description="The fit job queued, or the one on the way that kept it from being queued."
    )
    reason: str | None = Field(default=None, description="Why no fit was queued.")


class CampaignResultRead(LenientDocument, CampaignResult):
    """What an agent reported at the end of a profile campaign, and the fit queued after it."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=True)

    fit: CampaignFit | None = Field(default=None, description="With fit_after: the fit queued after it.")


# The payload and result model of each task kind.
TASK_PAYLOADS: dict[str, type[StoredDocument]] = {
    TaskKind.PROFILE_CAMPAIGN: CampaignPayload,
    TaskKind.VERIFY: VerifyPayload,
}
TASK_RESULTS: dict[str, type[StoredDocument]] = {
    TaskKind.PROFILE_CAMPAIGN: CampaignResultRead,
    TaskKind.VERIFY: VerifyResultRead,
}


class AgentTaskRead(BaseModel):
    """A task of a device agent."""

    id: int
    device_id: int
    kind: TaskKind
    status: TaskStatus
    payload: CampaignPayload | VerifyPayload = Field(
        description="What to do: CampaignPayload for a profile_campaign, VerifyPayload for a verify task."
    )
    result: CampaignResultRead | VerifyResultRead | None = Field(
        description="Once succeeded: CampaignResultRead for a profile_campaign, VerifyResultRead for a verify task."
    )
    error: str | None
    progress: AgentTaskProgress | None = Field(description="What the agent last reported with a heartbeat.")
    job_id: int | None = Field(description="The plan job a verify task measures for.")
    lease_owner: str | None
    lease_expires_at: datetime | None
    lease_expired: bool = Field(description="Leased, but its agent stopped renewing the lease.")
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    resumed: bool = Field(
        default=False, description="On a lease: the agent already held this task (it restarted)."
    )

    @field_validator("payload", "result", mode="before")
    @classmethod
    def _document_of_its_kind(cls, value: Any, info: ValidationInfo) -> Any:
        models = TASK_PAYLOADS if info.field_name == "payload" else TASK_RESULTS
        return document_of_kind(models, value, info)


class AgentHelloRead(BaseModel):
    """What an agent learns when it says hello."""

    agent_id: str
    key_scope: str = Field(description="Scope of the key the agent used (agent or admin).")
    device: AgentDeviceRead
    lease_seconds: float = Field(description="The server's default task lease.")
    has_predictor: bool
    campaign: AgentTaskRead | None = Field(description="The device's open profile campaign, if any.")
    campaign_queued: bool = Field(description="Whether this hello queued that campaign.")


class TaskLeaseRequest(RequestModel):
    """Ask for the next task of the device (204 when there is none)."""

    agent_id: AgentId
    device: DeviceRef | None = Field(default=None, description="Needed with an admin key.")
    lease_seconds: LeaseSeconds | None = None


class TaskHeartbeat(RequestModel):
    """Keep a lease alive, and say how far the task got."""

    agent_id: AgentId
    lease_seconds: LeaseSeconds | None = None
    progress: HeartbeatProgress | None = None

    @field_validator("progress")
    @classmethod
    def _small_progress(cls, value: HeartbeatProgress | None) -> HeartbeatProgress | None:
        if value is not None:
            _bounded_document(value.as_json(), "progress")
        return value


class TaskComplete(RequestModel):
    """A finished task's result; sending the same result again changes nothing."""

    agent_id: AgentId
    result: dict[str, FiniteJson]

    @field_validator("result")
    @classmethod
    def _small_result(cls, value: dict[str, Any]) -> dict[str, Any]:
        checked = _bounded_document(value, "result")
        assert checked is not None
        return checked


class TaskFail(RequestModel):
    """A task the agent could not do, and why."""

    agent_id: AgentId
    error: str = Field(min_length=1, max_length=4000)
    retry: bool = Field(default=False, description="Put it back in the queue if attempts are left.")


class SampleKeysRead(BaseModel):
    """Sample keys a device has measurements for (network and isolated-layer rows)."""

    device_id: int
    sample_keys: list[str]
