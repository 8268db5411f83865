"""Schemas shared by several resources: the base of request bodies, probes, device and predictor references,
and the page of every list."""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# What the first run profiles, and a campaign measures unless told otherwise: three common
# torchvision families, dense convolutions on either side of the machine's spill point
# (`wide_dense`), and seeded random CNNs (`generated`); docs/predictor.md.
FIRST_RUN_FAMILIES: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v2", "wide_dense", "generated")

# Names end up in URLs and on command lines, so keep them to characters that need no quoting.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

# Ids are 32-bit on every backend; a larger number cannot name a row.
MAX_ID = 2**31 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID)]

ItemT = TypeVar("ItemT")


def reads_as_id(ref: str) -> bool:
    """Whether a device reference is a numeric id: ASCII digits only.

    Python's `isdigit` also accepts characters such as "²" that `int` cannot read, so those are names.
    """
    return ref.isascii() and ref.isdigit()


def not_an_id(name: str) -> str:
    """A device name, refused when it would read as an id (a pydantic validator's body).

    Raises:
        ValueError: the name is all ASCII digits.
    """
    if reads_as_id(name):
        raise ValueError("a device name cannot be all digits (it would read as a device id)")
    return name


def no_nul(text: str) -> str:
    """A string without NUL characters (a pydantic validator's body): PostgreSQL cannot compare text
    holding one, so it is refused as bad input before any lookup.

    Raises:
        ValueError: the string holds a NUL character.
    """
    if "\x00" in text:
        raise ValueError("a name cannot contain a NUL character")
    return text


DeviceRef = Annotated[
    Id | Annotated[str, Field(min_length=1, max_length=128), AfterValidator(no_nul)],
    Field(description="The device's numeric id or its name.", examples=["laptop-1t", 3]),
]


class RequestModel(BaseModel):
    """Base of request bodies: an unknown field is refused, and so is NaN or infinity in a float field.

    Requests end up stored as JSON, which has no NaN or infinity; a float field of a subclass answers
    422 naming the field instead (pydantic's ``allow_inf_nan=False``). Free-form JSON fields use
    `profiler.environment.FiniteJson` for the same check at any depth.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class HealthStatus(BaseModel):
    """Answer of ``/healthz``: the process is up."""

    status: Literal["ok"] = "ok"


class ReadyStatus(BaseModel):
    """Answer of ``/readyz``: the process is up and its database answers."""

    status: Literal["ok"] = "ok"
    database: str = Field(description="Backend of the database that answered (sqlite or postgresql).")


class PredictorRef(BaseModel):
    """Which fitted predictor answered."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    version: int


class Page(BaseModel, Generic[ItemT]):
    """One page of a list. Ask for the next one with ``cursor=next_cursor`` and the same filters."""

    items: list[ItemT]
    next_cursor: str | None = Field(
        description="Pass as `cursor` (with the same filters) for the next page; null on the last page."
    )
