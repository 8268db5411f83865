"""Pruning plans under a latency budget."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.db.models import JobStatus
from service.schemas.architectures import Architecture
from service.schemas.common import MAX_ID, DeviceRef, RequestModel
from service.schemas.devices import AllocatorRead

PlanMode = Literal["architecture", "weights", "train"]


class PlanOptions(RequestModel):
    """How to plan."""

    mode: PlanMode = Field(
        default="architecture",
        description="architecture: widths only; weights: also which filters to keep (needs model_id); "
        "train: W-Gates trained with the network.",
    )
    round_to: int = Field(default=8, ge=1, le=256, description="Kept channels are multiples of this.")
    verify: bool = Field(
        default=False,
        description="Measure the pruned network on the device and re-plan until it fits. On a local device "
        "the server's own machine measures, which needs an admin key; on a remote device its agent "
        "measures (any key that may plan), and the plan shows status running with progress phase "
        "waiting_for_agent while it waits.",
    )
    model_id: int | None = Field(
        default=None, ge=1, le=MAX_ID, description="Uploaded weights (POST /v1/models)."
    )
    max_skew: float | None = Field(
        default=1.25,
        ge=1,
        description="Allocation band: each group's keep ratio stays within this factor of the uniform keep "
        "ratio that meets the budget, and its pruned share within this factor of the uniform pruned share "
        "(1: uniform widths; null: no band around the uniform ratio, only the minimum). A plan that cannot "
        "meet the budget inside the band says so in result.warnings.",
    )
    min_keep_ratio: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="Least share of its channels any group keeps, unless the budget needs a uniform keep "
        "ratio under it (the plan then warns).",
    )


class PlanCreate(RequestModel):
    """Plan per-layer pruning ratios so the network meets `budget_ms` on the device."""

    device: DeviceRef
    architecture: Architecture
    budget_ms: float = Field(gt=0, description="Latency budget in milliseconds.")
    options: PlanOptions = Field(default_factory=PlanOptions)


class PlanRead(BaseModel):
    """A plan job: its status, then its result or error.

    A plan verified on a remote device stays ``running`` while it waits for the device's agent, with
    progress phase ``waiting_for_agent`` (no worker is busy with it meanwhile).
    """

    id: int
    status: JobStatus
    device_id: int | None
    allocator: AllocatorRead | None = Field(
        description="The allocator policy of the device's latencies, which the plan's hold under too "
        "(null when the plan's device no longer exists)."
    )
    budget_ms: float
    options: dict[str, Any]
    progress: dict[str, Any] | None = Field(description="phase, message (percent while computing).")
    result: dict[str, Any] | None = Field(
        description="The plan (widths, per-layer ratios, latencies, warnings). result.allocation reports how "
        "uneven it is: keep_ratio_min and keep_ratio_max over the groups, and the band it was held to "
        "(uniform_keep_ratio, band_low, band_high, max_skew, min_keep_ratio, groups_outside_band)."
    )
    error: str | None
    created_at: datetime
    deadline_at: datetime | None = Field(
        description="The plan fails as timed out if it has not finished by then (LPNET_WORKER__PLAN_TIMEOUT_SECONDS)."
    )
    finished_at: datetime | None
