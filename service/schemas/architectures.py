"""How a client names an architecture: a JSON IR document, or a torchvision model and input shape."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, model_validator

from lpnet.arch.ir import Network
from service.schemas.common import RequestModel

# Inputs a model may be named with: sides up to 3x efficientnet_b7's 600 px, and up to as many
# elements as 32 images of 3x672x672 (3x the usual 224 px). The model is traced on the meta device,
# so the trace costs no more at the largest input than at the smallest; the IR's bounds
# (`lpnet.arch.ir`: parameters, multiply-accumulates, activation memory) apply to the traced network.
MAX_TRACE_SIDE = 1800
MAX_TRACE_ELEMENTS = 32 * 3 * 672 * 672


class TorchvisionArchitecture(RequestModel):
    """A torchvision classification model by name, traced into the IR by the service."""

    torchvision: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$", examples=["resnet50"])
    input_shape: tuple[
        Annotated[int, Field(ge=1, le=64)],
        Annotated[int, Field(ge=1, le=16)],
        Annotated[int, Field(ge=8, le=MAX_TRACE_SIDE)],
        Annotated[int, Field(ge=8, le=MAX_TRACE_SIDE)],
    ] = Field(default=(1, 3, 224, 224), description="(N, C, H, W)")

    @model_validator(mode="after")
    def _bounded_input(self) -> TorchvisionArchitecture:
        elements = math.prod(self.input_shape)
        if elements > MAX_TRACE_ELEMENTS:
            raise ValueError(
                f"input_shape {list(self.input_shape)} has {elements} elements; at most "
                f"{MAX_TRACE_ELEMENTS} (32x3x672x672) can be traced"
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
