"""Per-layer charts: which layers they show, and that a plan's chart draws from its layers' rows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.image import imread
from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.gates.chart import (
    MAX_CHART_LAYERS,
    PlanChartSummary,
    PlanLayerRow,
    latency_bar_chart,
    layer_latency_chart,
    plan_chart_summary,
    plan_layer_rows,
    plan_layers_chart,
    slowest_in_order,
)
from lpnet.gates.result import CostSummary, LatencyEstimate, LayerPlan, PlanResult

SUMMARY = PlanChartSummary(
    network="net", mode="architecture-only", unpruned_ms=3.0, planned_ms=2.0, budget_ms=2.1
)


def image_of(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(imread(io.BytesIO(png), format="png"))


def width_for(layers: int) -> int:
    """Pixel width of a chart of `layers` bars: 0.22 inch each and 2 inches of margins, 6 at least, 100 dpi."""
    return round(100 * max(6.0, 0.22 * layers + 2.0))


def rows(count: int, ms: float = 1.0) -> list[PlanLayerRow]:
    return [PlanLayerRow(f"layer{i}", ms + 0.01 * i, ms / 2, 64, 32) for i in range(count)]


def test_slowest_rows_are_kept_in_their_order() -> None:
    layers = [("a", 1.0), ("b", 5.0), ("c", 0.5), ("d", 3.0), ("e", 4.0)]
    assert slowest_in_order(layers, lambda layer: layer[1], 3) == [("b", 5.0), ("d", 3.0), ("e", 4.0)]
    assert slowest_in_order(layers, lambda layer: layer[1], 10) == layers
    assert slowest_in_order(layers, lambda layer: layer[1], 0) == []


def test_a_plan_chart_widens_with_its_layers_up_to_the_limit() -> None:
    narrow, wide, capped = (image_of(plan_layers_chart(rows(n), SUMMARY)) for n in (3, 60, 200))
    assert narrow.shape[:2] == (720, 600)  # the smallest figure: 6 x 7.2 inches at 100 dpi
    assert abs(wide.shape[1] - width_for(60)) <= 1
    assert abs(capped.shape[1] - width_for(MAX_CHART_LAYERS)) <= 1


def test_a_plan_chart_leaves_out_layers_under_one_percent_of_the_slowest() -> None:
    tiny = [PlanLayerRow(f"add{i}", 0.001, 0.001, 64, 32) for i in range(60)]
    with_tiny = image_of(plan_layers_chart([*rows(3), *tiny], SUMMARY))
    assert with_tiny.shape == image_of(plan_layers_chart(rows(3), SUMMARY)).shape


def test_a_latency_chart_draws_every_layer_up_to_the_limit() -> None:
    def chart(count: int, max_layers: int = MAX_CHART_LAYERS) -> np.ndarray:
        layers = [(f"layer{i}", 0.001 * (i + 1)) for i in range(count)]
        return image_of(
            latency_bar_chart(
                layers, network="net", total_ms=1.0, low_ms=0.9, high_ms=1.1, max_layers=max_layers
            )
        )

    # Unlike a plan's chart, tiny layers stay: 50 layers from 0.001 to 0.05 ms are 50 bars.
    fifty = chart(50)
    assert fifty.shape[0] == 480 and abs(fifty.shape[1] - width_for(50)) <= 1
    assert abs(chart(50, max_layers=30).shape[1] - width_for(30)) <= 1
    assert chart(0).shape[:2] == (480, 600)


def test_a_plan_result_becomes_rows_of_its_layers() -> None:
    network = network_from_module(
        nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)), (1, 3, 16, 16)
    )
    layers = [
        LayerPlan("conv_a", "conv2d", 3, 16, 3, 12, 0.25, 0.8, 0.6),
        LayerPlan("conv_b", "conv2d", 16, 8, 12, 8, 0.0, 0.5, 0.4),
    ]
    result = PlanResult(
        mode="architecture-only",
        network_name=None,
        network_hash=network.content_hash,
        budget_ms=1.2,
        round_to=4,
        widths=[12],
        groups=[],
        layers=layers,
        predicted=LatencyEstimate(1.1, 1.0, 1.2),
        unpruned_predicted=LatencyEstimate(1.4, 1.3, 1.5),
        min_achievable_ms=0.5,
        cost_before=CostSummary(1, 2, 3),
        cost_after=CostSummary(1, 2, 3),
        rounds=[],
        met_budget=None,
        capacity=0.1,
        plan_seconds=0.1,
        pruned_network=network,
    )
    assert plan_layer_rows(result) == [
        PlanLayerRow("conv_a", 0.8, 0.6, 16, 12),
        PlanLayerRow("conv_b", 0.5, 0.4, 8, 8),
    ]
    summary = plan_chart_summary(result)
    assert summary == PlanChartSummary(network.content_hash[:12], "architecture-only", 1.4, 1.1, 1.2)
    assert layer_latency_chart(result) == plan_layers_chart(plan_layer_rows(result), summary)


@pytest.mark.parametrize("count", [1, 5])
def test_a_chart_is_not_blank(count: int) -> None:
    image = image_of(plan_layers_chart(rows(count), SUMMARY))
    assert image[..., :3].std() > 0.05
