"""How the client sends an architecture: a torchvision name with an input shape, the IR, or an ONNX
file to upload; an nn.Module is traced into the IR on this machine first (the only use of torch here).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from lpnet.arch.ir import Network

if TYPE_CHECKING:
    from torch import nn

Architecture = Union[str, Network, Mapping[str, Any], bytes, "os.PathLike[str]", "nn.Module"]  # noqa: UP007
"""A torchvision name, the IR (a `Network` or its dict), ONNX bytes or an .onnx path, or an nn.Module."""


def is_module(value: Any) -> bool:
    # A module can only exist once torch is imported: checking needs no import of torch here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def onnx_bytes(architecture: Architecture) -> bytes | None:
    """The ONNX file an architecture names, read on this machine, or None for other kinds."""
    if isinstance(architecture, bytes):
        return None if architecture.lstrip()[:1] == b"{" else architecture
    if isinstance(architecture, os.PathLike) or (
        isinstance(architecture, str) and architecture.lower().endswith(".onnx")
    ):
        path = Path(architecture)
        if path.suffix.lower() == ".onnx":
            return path.read_bytes()
    return None


def onnx_filename(architecture: Architecture) -> str:
    if isinstance(architecture, str | os.PathLike):
        return Path(architecture).name
    return "model.onnx"


def architecture_json(architecture: Architecture, input_shape: Sequence[int] | None) -> dict[str, Any]:
    """The request's ``architecture`` field: ``{"torchvision": ..., "input_shape": ...}`` or the IR."""
    if isinstance(architecture, Network):
        return architecture.model_dump(mode="json")
    if isinstance(architecture, Mapping):
        return dict(architecture)
    if isinstance(architecture, bytes):
        return dict(json.loads(architecture))
    if isinstance(architecture, os.PathLike):
        return dict(json.loads(Path(architecture).read_bytes()))
    if isinstance(architecture, str):
        if architecture.lstrip().startswith("{"):
            return dict(json.loads(architecture))
        if architecture.lower().endswith(".json"):
            return dict(json.loads(Path(architecture).read_bytes()))
        named: dict[str, Any] = {"torchvision": architecture}
        if input_shape is not None:
            named["input_shape"] = [int(v) for v in input_shape]
        return named
    if is_module(architecture):
        if input_shape is None:
            raise ValueError("an nn.Module needs input_shape=(N, C, H, W) to be traced into the IR")
        from lpnet.arch.from_torch import network_from_module

        return network_from_module(architecture, input_shape).model_dump(mode="json")
    raise TypeError(
        f"cannot send a {type(architecture).__name__} as an architecture: pass a torchvision name, the IR "
        "(a Network or its dict), ONNX bytes or an .onnx path, or an nn.Module with input_shape"
    )
