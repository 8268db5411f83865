"""Per-layer predicted latency before and after a plan, as a PNG bar chart.

Uses matplotlib's object API with the Agg canvas, so importing this never changes the process-wide
backend (no pyplot state, safe in a server worker).
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lpnet.gates.result import PlanResult

# Layers whose unpruned prediction is below this share of the largest layer are left out of the chart.
_MIN_SHARE = 0.01


def layer_latency_chart(result: PlanResult, max_layers: int = 80) -> bytes:
    """PNG bytes: one pair of bars (before, after) per layer, in network order.

    Args:
        result: the plan.
        max_layers: at most this many layers are drawn, the slowest ones before pruning, kept in
            network order; tiny layers are dropped first.
    """
    layers = list(result.layers)
    if layers:
        largest = max(layer.predicted_ms_before for layer in layers)
        layers = [lay for lay in layers if lay.predicted_ms_before >= _MIN_SHARE * largest]
    if len(layers) > max_layers:
        slowest = sorted(layers, key=lambda lay: -lay.predicted_ms_before)[:max_layers]
        keep = {lay.name for lay in slowest}
        layers = [lay for lay in layers if lay.name in keep]
    width = max(6.0, 0.22 * len(layers) + 2.0)
    figure = Figure(figsize=(width, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(layers)))
    axes.bar(
        [p - 0.2 for p in positions],
        [lay.predicted_ms_before for lay in layers],
        width=0.4,
        label=f"unpruned ({result.unpruned_predicted.total_ms:.2f} ms)",
        color="#9aa5b1",
    )
    axes.bar(
        [p + 0.2 for p in positions],
        [lay.predicted_ms_after for lay in layers],
        width=0.4,
        label=f"planned ({result.predicted.total_ms:.2f} ms, budget {result.budget_ms:.2f} ms)",
        color="#2f6db5",
    )
    axes.set_xticks(positions)
    axes.set_xticklabels([lay.name for lay in layers], rotation=90, fontsize=6)
    axes.set_ylabel("predicted latency (ms)")
    title = result.network_name or result.network_hash[:12]
    axes.set_title(f"{title}: per-layer latency before and after the plan ({result.mode})")
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
