"""Service settings, read from the environment (prefix ``LPNET_``) through a cached `get_settings()`."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from profiler.environment import DEFAULT_SECONDS_PER_PROCESS
from profiler.family_names import describe_special_families
from service.schemas.common import FIRST_RUN_FAMILIES, NAME_PATTERN, not_an_id

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

DATABASE_FILENAME = "lpnet.db"
# LPNET_ADMIN_KEY must be as strong as the keys `service.auth.generate_api_key` makes: 'lpn_' and 43
# url-safe characters (256 random bits).
ADMIN_KEY_RANDOM_CHARS = 43
ADMIN_KEY_PATTERN = re.compile(rf"lpn_[A-Za-z0-9_-]{{{ADMIN_KEY_RANDOM_CHARS},}}")
# A key written by hand rather than drawn at random is refused: one holding a placeholder word
# (compared in lower case without '-' and '_', so 'Change_Me' counts), one with fewer distinct
# characters after 'lpn_' than this (43 random characters have about 31; fewer than 20 happens to
# one random key in 50 million), or one whose characters after 'lpn_' repeat a run of
# ADMIN_KEY_REPEATED_RUN characters (one random key in 10^12).
ADMIN_KEY_PLACEHOLDERS = ("changeme", "placeholder", "example")
ADMIN_KEY_MIN_DISTINCT_CHARS = 20
ADMIN_KEY_REPEATED_RUN = 8
# What `generate_api_key` does, as a line to run anywhere.
MAKE_A_KEY = (
    "make one with `lpnet keys create --scope admin` (on another database) or "
    "python3 -c \"import base64, os; print('lpn_' + base64.urlsafe_b64encode(os.urandom(32)).decode()[:43])\""
)
MeasuredKind = Literal["network", "in_context", "isolated"]
# What a fit learns from: whole networks, and the layers of some of them timed in context.
FIRST_RUN_KINDS: tuple[MeasuredKind, ...] = ("network", "in_context")


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
    plan_timeout_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Longest a plan may take from being queued to its result, verification rounds included; "
        "then it fails as timed out.",
    )
    fit_timeout_seconds: float = Field(
        default=7200.0,
        gt=0,
        description="Longest a fit (or a job of a kind without a timeout of its own) may take from being "
        "queued to its result.",
    )
    first_run_timeout_seconds: float = Field(
        default=7200.0,
        gt=0,
        description="Time the first-run bootstrap may take on top of its profiling budget "
        "(LPNET_FIRST_RUN__BUDGET_MINUTES): the fit, and measuring what a fit lacks on a slow machine.",
    )


class QuotaSettings(BaseModel):
    """Limits on the plans one reader key may request (``LPNET_QUOTA__<FIELD>``); admin keys are exempt."""

    active_plans: int = Field(
        default=4, ge=1, le=10_000, description="Plans of one reader key queued or running at once."
    )
    plans_per_hour: int = Field(
        default=60, ge=1, le=1_000_000, description="Plans one reader key may request in any hour."
    )


class FitSettings(BaseModel):
    """Predictor fits (``LPNET_FIT__<FIELD>``); unset fields keep lpnet's defaults."""

    steps: int | None = Field(default=None, ge=1, description="Optimisation steps per ensemble member.")
    members: int | None = Field(default=None, ge=1, le=32, description="Ensemble members (interval width).")


class AgentSettings(BaseModel):
    """Tasks for the agents of remote devices (``LPNET_AGENT__<FIELD>``)."""

    lease_seconds: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="An agent's lease on a task; renewed by its heartbeats, requeued once it lapses.",
    )
    max_attempts: int = Field(default=3, ge=1, le=100, description="Leases of one task before it fails.")
    verify_timeout_seconds: float = Field(
        default=1800.0,
        gt=0,
        description="How long a plan with verify waits for the remote device's agent to measure a network.",
    )
    verify_protocol: Literal["default", "quick"] = Field(
        default="default",
        description="Timing protocol agents verify plans with; quick is for smoke runs and tests.",
    )


class FirstRunSettings(BaseModel):
    """What `lpnet serve` does on a machine without a local device (``LPNET_FIRST_RUN__<FIELD>``).

    It registers this machine's CPU as a device, profiles it within a time budget and fits its
    predictor in a background job, then refines that predictor in rounds of profiling and refitting;
    a later start resumes what is unfinished, or does nothing once it is done.
    """

    enabled: bool = Field(default=True, description="Bootstrap the local device when `lpnet serve` starts.")
    device_name: str = Field(
        default="local-cpu",
        min_length=1,
        max_length=128,
        pattern=NAME_PATTERN,
        description="Name of the local device it registers (not all digits).",
    )
    budget_minutes: float = Field(
        default=6.0, gt=0, le=24 * 60, description="Profiling time; fitting the predictor comes on top."
    )
    families: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(FIRST_RUN_FAMILIES),
        min_length=1,
        description=f"Families profiled, comma-separated: torchvision model names, {describe_special_families('`')}.",
    )
    image_size: int = Field(default=224, ge=16, le=1024, description="Input height and width profiled.")
    kinds: Annotated[list[MeasuredKind], NoDecode] = Field(
        default_factory=lambda: list(FIRST_RUN_KINDS),
        min_length=1,
        description="What is measured, comma-separated: whole networks, and the layers of some in context, "
        "are what a fit learns from.",
    )
    quick_protocol: bool = Field(
        default=False, description="A loose timing protocol: for smoke runs and tests, not for real numbers."
    )
    seconds_per_process: float = Field(
        default=DEFAULT_SECONDS_PER_PROCESS,
        ge=0,
        le=24 * 3600,
        description="Measure in child processes, each replaced after this many seconds, so every timing "
        "comes from a young process as a deployment's does; 0 measures in the job's own process.",
    )
    fit: FitSettings = Field(
        default_factory=FitSettings,
        description="Fit settings of the first predictor and of each refit; unset fields fall back to "
        "LPNET_FIT__*.",
    )
    refine_minutes: float = Field(
        default=24.0,
        ge=0,
        le=24 * 60,
        description="Profiling time of the refining that follows the first predictor in the background, "
        "shared by its rounds (each refit comes on top); 0 turns refining off.",
    )
    refine_rounds: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Rounds of refining: each profiles where the newest predictor is least sure, then "
        "stores the next predictor version.",
    )

    @field_validator("device_name")
    @classmethod
    def _not_a_number(cls, value: str) -> str:
        return not_an_id(value)

    @field_validator("families", "kinds", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value


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
        # Above the largest route limit: the weights upload, LPNET_MAX_WEIGHTS_BYTES and its form fields.
        default=256 * 1024 * 1024,
        gt=0,
        description="Ceiling on every request body, in bytes; each route's own limit applies below it.",
    )
    max_json_bytes: int = Field(
        # 10,000 width vectors of a 200-group network (densenet201) with its IR take about 7 MiB.
        default=8 * 1024 * 1024,
        gt=0,
        description="Largest JSON request body, in bytes, of the routes without a limit of their own.",
    )
    max_profile_batch_bytes: int = Field(
        # A row holds its network's IR and per-layer times: about 50 KiB for resnet50 and 320 KiB for
        # densenet201 (707 layers), so a sink's default batch of 50 such rows is about 16 MiB.
        default=32 * 1024 * 1024,
        gt=0,
        description="Largest profile batch an agent may post to /v1/devices/{device}/profiles, in bytes.",
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
        description="How long a checked API key is trusted without asking the database (0: always ask). "
        "A key revoked through this server's API stops working here at once; one revoked by `lpnet keys "
        "revoke` or through another server keeps working here for up to this long.",
    )
    latency_plot_ttl_seconds: float = Field(
        default=24 * 3600.0,
        gt=0,
        le=3650 * 24 * 3600.0,
        description="How long the chart of a latency query with `plot` stays readable at its plot_url; "
        "older ones are deleted.",
    )
    torch_threads: int = Field(
        default=1, ge=1, le=256, description="torch intra-op threads of the server and workers."
    )
    log_level: LogLevel = "INFO"
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    fit: FitSettings = Field(default_factory=FitSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    first_run: FirstRunSettings = Field(default_factory=FirstRunSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    admin_key: SecretStr | None = Field(
        default=None,
        description="An admin API key `lpnet serve` makes sure exists (e.g. shared with an agent container); "
        "never printed.",
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Resolved once so the derived SQLite URL does not change if the process changes directory.
        return value.expanduser().resolve()

    @field_validator("admin_key", mode="before")
    @classmethod
    def _empty_admin_key_is_unset(cls, value: object) -> object:
        # `.env.example` lists LPNET_ADMIN_KEY with no value: an empty key means none was set.
        return None if value == "" else value

    @field_validator("admin_key")
    @classmethod
    def _strong_admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        problem = None if value is None else admin_key_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(f"LPNET_ADMIN_KEY {problem}; {MAKE_A_KEY}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _default_database_url(self) -> Settings:
        if not self.database_url.strip():
            self.database_url = sqlite_url_for(self.data_dir / DATABASE_FILENAME)
        return self


def admin_key_problem(key: str) -> str | None:
    """Why `key` cannot be an admin key set from outside (None when it can); never quotes the key.

    It must have the form of the keys lpnet makes and look drawn at random: no placeholder word, at
    least `ADMIN_KEY_MIN_DISTINCT_CHARS` distinct characters and no repeated run of
    `ADMIN_KEY_REPEATED_RUN` characters after the 'lpn_' marker.
    """
    if ADMIN_KEY_PATTERN.fullmatch(key) is None:
        return (
            f"must look like the keys lpnet makes: 'lpn_' and at least {ADMIN_KEY_RANDOM_CHARS} letters, "
            "digits, '-' or '_'"
        )
    random_part = key.removeprefix("lpn_")
    folded = random_part.lower().replace("-", "").replace("_", "")
    for word in ADMIN_KEY_PLACEHOLDERS:
        if word in folded:
            return f"is a placeholder (it contains {word!r}), not a secret"
    distinct = len(set(random_part))
    if distinct < ADMIN_KEY_MIN_DISTINCT_CHARS:
        return (
            f"is not random: it has {distinct} distinct characters after 'lpn_', and a random key has "
            f"about 31 (at least {ADMIN_KEY_MIN_DISTINCT_CHARS} are required)"
        )
    runs = [
        random_part[i : i + ADMIN_KEY_REPEATED_RUN]
        for i in range(len(random_part) - ADMIN_KEY_REPEATED_RUN + 1)
    ]
    if len(set(runs)) < len(runs):
        return f"is not random: it repeats a run of {ADMIN_KEY_REPEATED_RUN} characters"
    return None


def sqlite_url_for(path: Path) -> str:
    """Return the SQLAlchemy URL of an SQLite database file."""
    return f"sqlite:///{path.expanduser().resolve().as_posix()}"


# Names the file `load_env_file` reads ("" reads none); `.env` in the working directory when unset.
ENV_FILE_VARIABLE = "LPNET_ENV_FILE"


def load_env_file() -> Path | None:
    """Put the variables of the `.env` file into the environment, where they are not set already.

    The file is `.env` in the working directory, or the one `$LPNET_ENV_FILE` names (empty: none). It
    is the file Compose reads (`.env.example` lists its variables), so `lpnet` run beside
    `docker-compose.yml` sees the same LPNET_* settings and keys. Variables already in the environment
    win. Returns the file read, or None when there was none.

    Raises:
        FileNotFoundError: `$LPNET_ENV_FILE` names a file that does not exist.
    """
    named = os.environ.get(ENV_FILE_VARIABLE)
    if named == "":
        return None
    path = Path(named) if named is not None else Path(".env")
    if not path.is_file():
        if named is not None:
            raise FileNotFoundError(f"{ENV_FILE_VARIABLE} names {named!r}, which is not a file")
        return None
    for name, value in dotenv_values(path).items():
        if value is not None and name not in os.environ:
            os.environ[name] = value
    return path


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (cached; tests call ``get_settings.cache_clear()``)."""
    return Settings()
