"""Errors a pruning plan can raise. The service maps their `code` to HTTP statuses in one place."""

from __future__ import annotations

from typing import Any

from lpnet.errors import LpnetError


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


class DatasetUnavailable(LpnetError):
    """A dataset helper could not find its files (nothing is ever downloaded)."""

    code = "dataset_unavailable"
