"""What a profile submission answers. The request body is the profiler's `ProfileBatch`."""

from __future__ import annotations

from pydantic import BaseModel, Field


class RowCounts(BaseModel):
    """Rows of a batch, by table."""

    network: int = Field(ge=0, description="Whole-network measurements (network and in_context).")
    layer: int = Field(ge=0, description="Isolated layer measurements.")


class ProfileSubmissionRead(BaseModel):
    """The outcome of a batch; a replay with the same idempotency key gets this same answer again."""

    batch_id: int
    device_id: int
    run_id: int
    idempotency_key: str
    received: RowCounts
    stored: RowCounts
    skipped: RowCounts = Field(description="Rows whose sample key the device already had.")
    failed_rows: int = Field(ge=0, description="Stored rows that record a failed measurement.")
    in_network_layers: int = Field(
        ge=0, description="Per-layer times of in_context rows, also stored as layer measurements."
    )
    warnings: list[str] = Field(default_factory=list)
