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


class ExternalDataRefused(InvalidArchitecture):
    """An ONNX file with a tensor that keeps its data in another file; an upload must hold all its data.

    Following such a reference would read a file of the machine the model is read on.
    """

    code = "external_data_refused"

    def __init__(self, tensor: str, where: str) -> None:
        super().__init__(
            f"the ONNX tensor {tensor!r} ({where}) keeps its data in an external file, which is refused: "
            "save the model with every tensor inside the file "
            "(onnx.save_model(model, path, save_as_external_data=False))",
            {"tensor": tensor, "where": where},
        )
        self.tensor = tensor


class OnnxLimitExceeded(InvalidArchitecture):
    """An ONNX file larger than a limit of the reader (node count, tensor size, ...).

    `found` is the value seen; for a count over several graphs, the total up to the graph that crossed
    the limit.
    """

    code = "onnx_limit_exceeded"

    def __init__(self, limit: str, found: int, maximum: int, subject: str) -> None:
        super().__init__(
            f"the ONNX model is too large: {subject} is {found}, above the limit of {maximum} ({limit})",
            {"limit": limit, "found": found, "maximum": maximum},
        )
        self.limit = limit
        self.found = found
        self.maximum = maximum


class UnsupportedOpset(InvalidArchitecture):
    """An ONNX file importing an operator set (domain and version) the reader does not support."""

    code = "unsupported_opset"

    def __init__(self, domain: str, version: int | None, hint: str) -> None:
        shown = domain or "ai.onnx"
        found = f"{shown!r} version {version}" if version is not None else repr(shown)
        super().__init__(
            f"unsupported ONNX operator set {found}: {hint}", {"domain": domain, "version": version}
        )
        self.domain = domain
        self.version = version


class ArchitectureTooLarge(InvalidArchitecture):
    """A network beyond one of the IR's cost bounds (parameters, multiply-accumulates, activation memory).

    `details` names the bound, its limit and the network's value (or, when raised from a validation
    error, lists the field errors).
    """

    code = "architecture_too_large"


class GenerationError(LpnetError):
    """A generator request that cannot be met: seeds outside the split, or unreachable cost bounds."""

    code = "invalid_generation_request"


# Pruning plans -----------------------------------------------------------------------------------


class BudgetInfeasible(LpnetError):
    """The latency budget is below what the network reaches with every group at its minimum width."""

    code = "budget_infeasible"

    def __init__(
        self,
        budget_ms: float,
        min_achievable_ms: float,
        unpruned_ms: float | None = None,
        measured: bool = False,
    ) -> None:
        how = "measures" if measured else "is predicted to take"
        message = (
            f"latency budget {budget_ms:.4g} ms is infeasible: with every channel group at its minimum "
            f"width the network {how} {min_achievable_ms:.4g} ms; raise the budget to at "
            "least that, or lower min_keep_ratio / round_to"
        )
        details: dict[str, Any] = {
            "budget_ms": budget_ms,
            "min_achievable_ms": min_achievable_ms,
            "measured": measured,
        }
        if unpruned_ms is not None:
            details["unpruned_ms"] = unpruned_ms
        super().__init__(message, details)
        self.budget_ms = budget_ms
        self.min_achievable_ms = min_achievable_ms


class NoPrunableGroups(LpnetError):
    """The network has no channel group that pruning may change (e.g. a single classifier layer)."""

    code = "no_prunable_groups"


class WeightsMismatch(LpnetError):
    """A weight tensor is missing, unexpected, or has a shape the architecture does not have."""

    code = "weights_mismatch"

    def __init__(self, message: str, tensor: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, {"tensor": tensor, **(details or {})})
        self.tensor = tensor


class InvalidPlanOptions(LpnetError):
    """Plan options that contradict each other or the inputs given (e.g. weights mode without weights)."""

    code = "invalid_plan_options"


class PruningFailed(LpnetError):
    """Physical pruning produced a module whose channels differ from the plan, or could not run."""

    code = "pruning_failed"
