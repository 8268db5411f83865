"""Fitted predictors."""

from __future__ import annotations

from pydantic import Field

from service.schemas.devices import PredictorSummary


class PredictorRead(PredictorSummary):
    """A predictor's metrics, versions and where its plot is."""

    device: str
    plot_url: str | None = Field(description="Predicted-vs-measured PNG, when the fit produced one.")
