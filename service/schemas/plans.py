"""Pruning plans under a latency budget."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lpnet.gates.options import (
    FILTERS,
    MAX_SKEW,
    MIN_KEEP_RATIO,
    ROUND_TO,
    FilterChoice,
    ModeName,
    OptionSpec,
)
from service.db.models import JobStatus
from service.schemas.architectures import Architecture
from service.schemas.common import MAX_ID, DeviceRef, RequestModel
from service.schemas.devices import AllocatorRead
from service.schemas.documents import LenientDocument
from service.schemas.jobs import JobProgress
from service.schemas.plan_results import PlanResultRead

# What GET /v1/plans/{id}/model serves: the pruned weights with their IR, or the pruned network in ONNX.
PlanModelFormat = Literal["safetensors", "onnx"]
# The media type of each format, as the answer's Content-Type and as an Accept header asks for it.
PLAN_MODEL_MEDIA_TYPES: dict[PlanModelFormat, str] = {
    "safetensors": "application/octet-stream",
    "onnx": "application/onnx",
}


def planner_field(spec: OptionSpec[Any]) -> Any:
    """A request field with the planner option's default, bounds and description (`lpnet.gates.options`)."""
    return Field(
        default=spec.default, ge=spec.ge, gt=spec.gt, le=spec.le, lt=spec.lt, description=spec.description
    )


# The fields the planner has too are derived from its option specs; `service.plans.planner_options`
# hands them over by name.
class PlanOptions(RequestModel):
    """How to plan."""

    mode: ModeName = Field(
        default="architecture",
        description="architecture: widths only; weights: also which filters to keep (needs model_id). "
        "The train mode, which trains W-Gates with the network on a dataset, is `lpnet train`.",
    )
    round_to: int = planner_field(ROUND_TO)
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
    max_skew: float | None = planner_field(MAX_SKEW)
    min_keep_ratio: float = planner_field(MIN_KEEP_RATIO)
    filters: FilterChoice = planner_field(FILTERS)


class PlanOptionsRead(LenientDocument, PlanOptions):
    """The options a plan was requested with, as stored: a plan stored before an option existed lacks it."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=True)


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
    options: PlanOptionsRead
    progress: JobProgress | None = Field(description="phase, message (percent while computing).")
    result: PlanResultRead | None = Field(
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
