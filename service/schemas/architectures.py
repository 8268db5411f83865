"""How a client names an architecture: a JSON IR document, or a torchvision model and input shape."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from lpnet.arch.ir import Network

# Tracing runs a real forward pass on zeros, so the input it may be asked for is bounded.
MAX_TRACE_ELEMENTS = 32 * 3 * 224 * 224


class TorchvisionArchitecture(BaseModel):
    """A torchvision classification model by name, traced into the IR by the service."""

    model_config = ConfigDict(extra="forbid")

    torchvision: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$", examples=["resnet50"])
    input_shape: tuple[
        Annotated[int, Field(ge=1, le=64)],
        Annotated[int, Field(ge=1, le=16)],
        Annotated[int, Field(ge=8, le=1024)],
        Annotated[int, Field(ge=8, le=1024)],
    ] = Field(default=(1, 3, 224, 224), description="(N, C, H, W)")

    @model_validator(mode="after")
    def _bounded_input(self) -> TorchvisionArchitecture:
        elements = math.prod(self.input_shape)
        if elements > MAX_TRACE_ELEMENTS:
            raise ValueError(
                f"input_shape {list(self.input_shape)} has {elements} elements; at most "
                f"{MAX_TRACE_ELEMENTS} (32x3x224x224) can be traced"
            )
        return self


def _architecture_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "torchvision" if "torchvision" in value else "ir"
    return "torchvision" if isinstance(value, TorchvisionArchitecture) else "ir"


Architecture = Annotated[
    Annotated[Network, Tag("ir")] | Annotated[TorchvisionArchitecture, Tag("torchvision")],
    Discriminator(_architecture_kind),
    Field(description='A JSON IR network, or {"torchvision": "resnet50", "input_shape": [1, 3, 224, 224]}.'),
]
