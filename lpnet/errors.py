"""Domain errors of lpnet. The service maps them to HTTP status codes in one place."""

from __future__ import annotations

from typing import Any


class LpnetError(Exception):
    """Base of every error lpnet raises on purpose. `details` is JSON-serialisable context."""

    code = "lpnet_error"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidArchitecture(LpnetError):
    """A JSON IR document that does not describe a valid network."""

    code = "invalid_architecture"

    @classmethod
    def from_validation_error(cls, exc: Any) -> InvalidArchitecture:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(root)", "message": err["msg"]}
            for err in exc.errors(include_url=False)
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return cls(f"invalid architecture: {summary}", {"errors": errors})


class UnsupportedOperator(LpnetError):
    """A traced module or ONNX graph uses an operator the IR cannot represent."""

    code = "unsupported_operator"

    def __init__(self, op: str, layer: str, hint: str = "") -> None:
        message = f"unsupported operator {op!r} at layer {layer!r}"
        if hint:
            message += f": {hint}"
        super().__init__(message, {"op": op, "layer": layer})
        self.op = op
        self.layer = layer


class UnknownModel(LpnetError):
    """A torchvision model name that does not exist."""

    code = "unknown_model"


class InvalidWidthVector(LpnetError):
    """A width vector that does not fit the network's channel groups."""

    code = "invalid_width_vector"
