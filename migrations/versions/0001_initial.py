"""Initial schema: devices, profile runs and batches, measurements, predictors, jobs, API keys, uploads.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Written from `alembic revision --autogenerate` and reviewed: timestamps are plain
`DateTime(timezone=True)` (the model's UTCDateTime only adds Python-side UTC handling), and indexes
are created with `op.create_index`, which SQLite supports without rebuilding the table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _create_devices_keys_and_uploads()
    _create_jobs_tasks_and_runs()
    _create_layer_measurements()
    _create_network_measurements_and_batches()


def _create_devices_keys_and_uploads() -> None:
    """Devices, model uploads and API keys."""
    op.create_table(
        "device",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("hardware", sa.String(length=256), nullable=False),
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("environment", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("is_local", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("status", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("batch_size >= 1", name=op.f("ck_device_batch_size_positive")),
        sa.CheckConstraint("threads >= 1", name=op.f("ck_device_threads_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device")),
        sa.UniqueConstraint("name", name=op.f("uq_device_name")),
    )
    op.create_table(
        "model_upload",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("architecture", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_upload")),
    )
    op.create_index(op.f("ix_model_upload_sha256"), "model_upload", ["sha256"], unique=False)

    op.create_table(
        "api_key",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "scope <> 'agent' OR device_id IS NOT NULL", name=op.f("ck_api_key_agent_has_device")
        ),
        sa.CheckConstraint("scope IN ('admin', 'agent', 'reader')", name=op.f("ck_api_key_scope_valid")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_api_key_device_id_device"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_key_key_hash")),
    )
    op.create_index(op.f("ix_api_key_device_id"), "api_key", ["device_id"], unique=False)
    op.create_index(op.f("ix_api_key_prefix"), "api_key", ["prefix"], unique=False)


def _create_jobs_tasks_and_runs() -> None:
    """Jobs, agent tasks and profile runs."""
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("input", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("result", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("progress", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("3"), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed')", name=op.f("ck_job_status_valid")
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_job_attempts_non_negative")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_job_device_id_device"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job")),
    )
    op.create_index(op.f("ix_job_device_id"), "job", ["device_id"], unique=False)
    op.create_index("ix_job_status_created_at", "job", ["status", "created_at"], unique=False)

    op.create_table(
        "predictor",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("artifact", sa.LargeBinary(), nullable=False),
        sa.Column("feature_schema_version", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("training_fingerprint", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_predictor_device_id_device"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictor")),
        sa.UniqueConstraint("device_id", "version", name=op.f("uq_predictor_device_id_version")),
    )
    op.create_table(
        "profile_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("protocol", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("environment", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("summary", sa.JSON(none_as_null=True), nullable=True),
        sa.CheckConstraint("source IN ('local', 'agent')", name=op.f("ck_profile_run_source_valid")),
        sa.CheckConstraint(
            "status IN ('running', 'completed', 'failed', 'interrupted')",
            name=op.f("ck_profile_run_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_profile_run_device_id_device"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profile_run")),
    )
    op.create_index(op.f("ix_profile_run_device_id"), "profile_run", ["device_id"], unique=False)


def _create_layer_measurements() -> None:
    """Layer measurements."""
    op.create_table(
        "layer_measurement",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("sample_key", sa.String(length=256), nullable=False),
        sa.Column("context", sa.String(length=16), nullable=False),
        sa.Column("layer_config", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("layer_name", sa.String(length=256), nullable=True),
        sa.Column("network_hash", sa.String(length=64), nullable=True),
        sa.Column("median_ms", sa.Float(), nullable=True),
        sa.Column("p10_ms", sa.Float(), nullable=True),
        sa.Column("p90_ms", sa.Float(), nullable=True),
        sa.Column("cv", sa.Float(), nullable=True),
        sa.Column("repetitions", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "context IN ('isolated', 'in_network')", name=op.f("ck_layer_measurement_context_valid")
        ),
        sa.CheckConstraint(
            "status <> 'ok' OR median_ms IS NOT NULL", name=op.f("ck_layer_measurement_ok_has_latency")
        ),
        sa.CheckConstraint("status IN ('ok', 'failed')", name=op.f("ck_layer_measurement_status_valid")),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
            name=op.f("fk_layer_measurement_device_id_device"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["profile_run.id"],
            name=op.f("fk_layer_measurement_run_id_profile_run"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_layer_measurement")),
        sa.UniqueConstraint(
            "device_id", "sample_key", name=op.f("uq_layer_measurement_device_id_sample_key")
        ),
    )
    op.create_index(
        op.f("ix_layer_measurement_network_hash"), "layer_measurement", ["network_hash"], unique=False
    )
    op.create_index(op.f("ix_layer_measurement_run_id"), "layer_measurement", ["run_id"], unique=False)



def _create_network_measurements_and_batches() -> None:
    """Network measurements and profile batches."""
    op.create_table(
        "network_measurement",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("sample_key", sa.String(length=256), nullable=False),
        sa.Column("architecture", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("arch_hash", sa.String(length=64), nullable=False),
        sa.Column("family", sa.String(length=64), nullable=True),
        sa.Column("width_vector", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("median_ms", sa.Float(), nullable=True),
        sa.Column("p10_ms", sa.Float(), nullable=True),
        sa.Column("p90_ms", sa.Float(), nullable=True),
        sa.Column("cv", sa.Float(), nullable=True),
        sa.Column("repetitions", sa.Integer(), nullable=False),
        sa.Column("per_layer", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("residual_ms", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status <> 'ok' OR median_ms IS NOT NULL", name=op.f("ck_network_measurement_ok_has_latency")
        ),
        sa.CheckConstraint("status IN ('ok', 'failed')", name=op.f("ck_network_measurement_status_valid")),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
            name=op.f("fk_network_measurement_device_id_device"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["profile_run.id"],
            name=op.f("fk_network_measurement_run_id_profile_run"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_network_measurement")),
        sa.UniqueConstraint(
            "device_id", "sample_key", name=op.f("uq_network_measurement_device_id_sample_key")
        ),
    )
    op.create_index(
        op.f("ix_network_measurement_arch_hash"), "network_measurement", ["arch_hash"], unique=False
    )
    op.create_index(op.f("ix_network_measurement_run_id"), "network_measurement", ["run_id"], unique=False)

    op.create_table(
        "profile_batch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("response", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_profile_batch_device_id_device"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["profile_run.id"],
            name=op.f("fk_profile_batch_run_id_profile_run"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profile_batch")),
        sa.UniqueConstraint(
            "device_id", "idempotency_key", name=op.f("uq_profile_batch_device_id_idempotency_key")
        ),
    )
    op.create_index(op.f("ix_profile_batch_run_id"), "profile_batch", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_profile_batch_run_id"), table_name="profile_batch")

    op.drop_table("profile_batch")
    op.drop_index(op.f("ix_network_measurement_run_id"), table_name="network_measurement")
    op.drop_index(op.f("ix_network_measurement_arch_hash"), table_name="network_measurement")

    op.drop_table("network_measurement")
    op.drop_index(op.f("ix_layer_measurement_run_id"), table_name="layer_measurement")
    op.drop_index(op.f("ix_layer_measurement_network_hash"), table_name="layer_measurement")

    op.drop_table("layer_measurement")
    op.drop_index(op.f("ix_profile_run_device_id"), table_name="profile_run")

    op.drop_table("profile_run")
    op.drop_table("predictor")
    op.drop_index("ix_job_status_created_at", table_name="job")
    op.drop_index(op.f("ix_job_device_id"), table_name="job")

    op.drop_table("job")
    op.drop_index(op.f("ix_api_key_prefix"), table_name="api_key")
    op.drop_index(op.f("ix_api_key_device_id"), table_name="api_key")

    op.drop_table("api_key")
    op.drop_index(op.f("ix_model_upload_sha256"), table_name="model_upload")

    op.drop_table("model_upload")
    op.drop_table("device")
