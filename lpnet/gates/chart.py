"""Per-layer charts as PNG bytes: a plan's latency and widths before and after pruning, and one
network's predicted latency per layer.

Both draw from plain rows (`PlanLayerRow`, or name and milliseconds), so a `PlanResult` in memory and
a plan result stored as JSON give the same chart. Uses matplotlib's object API with the Agg canvas, so
importing this never changes the process-wide backend (no pyplot state, safe in a server worker).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from lpnet.gates.result import PlanResult

# Layers whose unpruned prediction is below this share of the largest layer are left out of a plan's
# chart: with a few hundred layers, the adds and activations would crowd out the ones pruning changes.
_MIN_SHARE = 0.01
MAX_CHART_LAYERS = 80
_BEFORE_COLOUR = "#9aa5b1"
_AFTER_COLOUR = "#2f6db5"

RowT = TypeVar("RowT")


class ChartedLayer(Protocol):
    """What a plan's chart reads of one layer: a plan computed here, or one read back from JSON."""

    @property
    def name(self) -> str: ...
    @property
    def predicted_ms_before(self) -> float: ...
    @property
    def predicted_ms_after(self) -> float: ...
    @property
    def out_channels(self) -> int: ...
    @property
    def kept_out_channels(self) -> int: ...


class ChartedTotal(Protocol):
    @property
    def total_ms(self) -> float: ...


class ChartedPlan(Protocol):
    """What a plan's chart reads of the whole plan."""

    @property
    def network_name(self) -> str | None: ...
    @property
    def network_hash(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def budget_ms(self) -> float: ...
    @property
    def layers(self) -> Sequence[ChartedLayer]: ...
    @property
    def predicted(self) -> ChartedTotal: ...
    @property
    def unpruned_predicted(self) -> ChartedTotal: ...


@dataclass(frozen=True)
class PlanLayerRow:
    """One layer of a plan: predicted ms and kept output channels, before and after pruning."""

    name: str
    ms_before: float
    ms_after: float
    width_before: int
    width_after: int


@dataclass(frozen=True)
class PlanChartSummary:
    """What a plan's chart says about the whole plan, in its title and legend."""

    network: str
    mode: str
    unpruned_ms: float
    planned_ms: float
    budget_ms: float


def plan_layer_rows(result: ChartedPlan) -> list[PlanLayerRow]:
    """The chart rows of a plan's layers, in network order."""
    return [
        PlanLayerRow(
            layer.name,
            layer.predicted_ms_before,
            layer.predicted_ms_after,
            layer.out_channels,
            layer.kept_out_channels,
        )
        for layer in result.layers
    ]


def plan_chart_summary(result: ChartedPlan) -> PlanChartSummary:
    """The title and legend figures of a plan's chart."""
    return PlanChartSummary(
        network=result.network_name or result.network_hash[:12],
        mode=str(result.mode),
        unpruned_ms=result.unpruned_predicted.total_ms,
        planned_ms=result.predicted.total_ms,
        budget_ms=result.budget_ms,
    )


def layer_latency_chart(result: PlanResult, max_layers: int = MAX_CHART_LAYERS) -> bytes:
    """PNG bytes of `plan_layers_chart` for a plan computed here."""
    return plan_layers_chart(plan_layer_rows(result), plan_chart_summary(result), max_layers)


def plan_layers_chart(
    rows: Sequence[PlanLayerRow], summary: PlanChartSummary, max_layers: int = MAX_CHART_LAYERS
) -> bytes:
    """PNG bytes: per layer, in network order, a pair of bars (before, after) of predicted latency
    above a pair of bars of kept output channels.

    Args:
        rows: the plan's layers in network order.
        summary: the plan's totals, budget and mode, for the title and legend.
        max_layers: at most this many layers are drawn, the slowest ones before pruning, kept in
            network order; layers under 1 % of the slowest one are dropped first.
    """
    largest = max((row.ms_before for row in rows), default=0.0)
    shown = [row for row in rows if row.ms_before >= _MIN_SHARE * largest]
    shown = slowest_in_order(shown, lambda row: row.ms_before, max_layers)
    figure = _figure(len(shown), height=7.2)
    latency_axes, width_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    _paired_bars(
        latency_axes,
        [row.ms_before for row in shown],
        [row.ms_after for row in shown],
        f"unpruned ({summary.unpruned_ms:.2f} ms)",
        f"planned ({summary.planned_ms:.2f} ms, budget {summary.budget_ms:.2f} ms)",
    )
    latency_axes.set_ylabel("predicted latency (ms)")
    latency_axes.set_title(
        f"{summary.network}: per-layer latency and width before and after the plan\nmode {summary.mode}",
        fontsize=10,
    )
    _paired_bars(
        width_axes,
        [row.width_before for row in shown],
        [row.width_after for row in shown],
        "unpruned",
        "planned",
    )
    width_axes.set_ylabel("output channels")
    _layer_ticks(width_axes, [row.name for row in shown])
    return _png(figure)


def latency_bar_chart(
    layers: Sequence[tuple[str, float]],
    *,
    network: str,
    total_ms: float,
    low_ms: float,
    high_ms: float,
    device: str | None = None,
    max_layers: int = MAX_CHART_LAYERS,
) -> bytes:
    """PNG bytes: one bar of predicted latency per layer, in network order, with the network's total
    and interval in the title.

    Args:
        layers: (layer name, predicted ms) in network order.
        network: the network's name for the title.
        total_ms, low_ms, high_ms: the network's predicted latency and its interval.
        device: the device predicted for, named in the title when given.
        max_layers: at most this many layers are drawn, the slowest ones, kept in network order.
    """
    shown = slowest_in_order(layers, lambda layer: layer[1], max_layers)
    figure = _figure(len(shown), height=4.8)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(shown)), [ms for _, ms in shown], width=0.7, color=_AFTER_COLOUR)
    axes.set_ylabel("predicted latency (ms)")
    where = f" on {device}" if device else ""
    title = f"{network}{where}: {_ms(total_ms)} ms predicted (interval {_ms(low_ms)}-{_ms(high_ms)} ms)"
    if len(shown) < len(layers):
        title += f"\nthe {len(shown)} slowest of {len(layers)} layers"
    axes.set_title(title, fontsize=10)
    _layer_ticks(axes, [name for name, _ in shown])
    return _png(figure)


def slowest_in_order(rows: Sequence[RowT], ms: Callable[[RowT], float], limit: int) -> list[RowT]:
    """The `limit` rows with the largest `ms`, in their original order (all of them when fewer)."""
    if len(rows) <= limit:
        return list(rows)
    slowest = sorted(range(len(rows)), key=lambda i: -ms(rows[i]))[: max(limit, 0)]
    return [rows[i] for i in sorted(slowest)]


def _ms(value: float) -> str:
    """Milliseconds to two decimals, or three significant digits below one (a tiny network's 0.0423)."""
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def _figure(layers: int, height: float) -> Figure:
    """A figure wide enough for `layers` labelled bars, on an Agg canvas."""
    figure = Figure(figsize=(max(6.0, 0.22 * layers + 2.0), height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _paired_bars(
    axes: Axes, before: Sequence[float], after: Sequence[float], before_label: str, after_label: str
) -> None:
    positions = range(len(before))
    axes.bar([p - 0.2 for p in positions], before, width=0.4, label=before_label, color=_BEFORE_COLOUR)
    axes.bar([p + 0.2 for p in positions], after, width=0.4, label=after_label, color=_AFTER_COLOUR)
    axes.margins(y=0.25)  # headroom above the tallest bars for the legend
    axes.legend(loc="upper right", fontsize=8)


def _layer_ticks(axes: Axes, names: Sequence[str]) -> None:
    axes.set_xticks(list(range(len(names))))
    axes.set_xticklabels(list(names), rotation=90, fontsize=6)


def _png(figure: Figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
