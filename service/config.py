"""Service settings, read from the environment (prefix ``LPNET_``) through a cached `get_settings()`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

DATABASE_FILENAME = "lpnet.db"


class WorkerSettings(BaseModel):
    """Background jobs (fits, plans): how workers claim and hold them (``LPNET_WORKER__<FIELD>``)."""

    embedded: bool = Field(
        default=True,
        description="`lpnet serve` runs a worker thread; turn off when `lpnet worker` processes do the work.",
    )
    threads: int = Field(default=1, ge=1, le=64, description="Jobs an embedded worker runs at once.")
    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A running job's lease; renewed while it runs, reclaimable once it lapses.",
    )
    poll_seconds: float = Field(default=1.0, gt=0, description="How often an idle worker looks for jobs.")
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Claims of one job before it is failed for good."
    )


class FitSettings(BaseModel):
    """Predictor fits (``LPNET_FIT__<FIELD>``); unset fields keep lpnet's defaults."""

    steps: int | None = Field(default=None, ge=1, description="Optimisation steps per ensemble member.")
    members: int | None = Field(default=None, ge=1, le=32, description="Ensemble members (interval width).")


class Settings(BaseSettings):
    """Configuration of the service, the worker and the CLI.

    Every field can be set as ``LPNET_<FIELD>`` (nested groups as ``LPNET_<GROUP>__<FIELD>``).
    ``database_url`` defaults to an SQLite file inside ``data_dir``; a ``postgresql+psycopg://`` URL is
    the path for more than one machine.
    """

    model_config = SettingsConfigDict(
        env_prefix="LPNET_",
        env_nested_delimiter="__",
        env_file=None,
        extra="ignore",
    )

    data_dir: Path = Field(
        default=Path(".lpnet-data"),
        description="Directory for the embedded SQLite database and other local state.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means an SQLite file `<data_dir>/lpnet.db`.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_request_bytes: int = Field(
        # A ResNet-50 in safetensors is about 100 MB; room for that plus its architecture.
        default=256 * 1024 * 1024,
        gt=0,
        description="Largest request body the API accepts, in bytes.",
    )
    max_onnx_bytes: int = Field(
        default=128 * 1024 * 1024, gt=0, description="Largest ONNX file /v1/latency/onnx accepts, in bytes."
    )
    max_weights_bytes: int = Field(
        default=240 * 1024 * 1024,
        gt=0,
        description="Largest safetensors file /v1/models accepts, in bytes.",
    )
    max_width_vectors: int = Field(
        default=10_000, gt=0, description="Width vectors one /v1/latency/batch request may hold."
    )
    predictor_cache_size: int = Field(
        default=16, ge=1, description="Loaded predictors kept in memory, per process."
    )
    architecture_cache_size: int = Field(
        default=64, ge=1, description="Traced torchvision architectures kept in memory, per process."
    )
    auth_cache_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How long a checked API key is trusted without asking the database (0: always ask); "
        "a key revoked elsewhere keeps working here that long.",
    )
    torch_threads: int = Field(
        default=1, ge=1, le=256, description="torch intra-op threads of the server and workers."
    )
    log_level: LogLevel = "INFO"
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    fit: FitSettings = Field(default_factory=FitSettings)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Resolved once so the derived SQLite URL does not change if the process changes directory.
        return value.expanduser().resolve()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _default_database_url(self) -> Settings:
        if not self.database_url.strip():
            self.database_url = sqlite_url_for(self.data_dir / DATABASE_FILENAME)
        return self


def sqlite_url_for(path: Path) -> str:
    """Return the SQLAlchemy URL of an SQLite database file."""
    return f"sqlite:///{path.expanduser().resolve().as_posix()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (cached; tests call ``get_settings.cache_clear()``)."""
    return Settings()
