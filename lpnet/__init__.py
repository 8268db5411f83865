"""lpnet: latency prediction (LPNet) and latency-budgeted channel pruning (W-Gates), as a library.

The public API works without a server::

    import lpnet

    net = lpnet.network("resnet18", input_shape=(1, 3, 224, 224))
    predictor = lpnet.load_predictor("predictor.safetensors")
    print(lpnet.latency(net, predictor).total_ms)
    result = lpnet.plan(net, predictor, budget_ms=5.0)
    pruned = lpnet.prune(torchvision.models.resnet18(), result)

`lpnet.client.Client` talks to the REST service. The names below are imported on first use, so
``import lpnet`` itself does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lpnet.api import latency, load_predictor, network, plan, prune
    from lpnet.arch.ir import Network
    from lpnet.errors import LpnetError
    from lpnet.gates.planner import PlanOptions
    from lpnet.gates.result import PlanResult
    from lpnet.predictor.predict import LatencyPredictor, Prediction

# Public name -> the module that defines it.
_EXPORTS = {
    "network": "lpnet.api",
    "load_predictor": "lpnet.api",
    "latency": "lpnet.api",
    "plan": "lpnet.api",
    "prune": "lpnet.api",
    "Network": "lpnet.arch.ir",
    "LpnetError": "lpnet.errors",
    "PlanOptions": "lpnet.gates.planner",
    "PlanResult": "lpnet.gates.result",
    "LatencyPredictor": "lpnet.predictor.predict",
    "Prediction": "lpnet.predictor.predict",
}

__all__ = [
    "LatencyPredictor",
    "LpnetError",
    "Network",
    "PlanOptions",
    "PlanResult",
    "Prediction",
    "latency",
    "load_predictor",
    "network",
    "plan",
    "prune",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lpnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
