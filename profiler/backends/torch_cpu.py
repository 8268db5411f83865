"""Eager PyTorch on the CPU with a fixed intra-op thread count."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from profiler.backends.base import Backend, Runnable

if TYPE_CHECKING:
    from torch import nn

    from lpnet.arch.ir import Network

logger = logging.getLogger(__name__)

# Nodes that move no data: timing them would only add clock overhead to the per-layer sum.
_UNTIMED_NODE_OPS = frozenset({"placeholder", "output", "get_attr"})


class LayerTimingInterpreter(fx.Interpreter):
    """Runs a GraphModule node by node, timing each computing node inside one real forward.

    Argument lookup happens outside the timed region, so a node's time is the call itself plus
    whatever the device needs to finish it (`sync`, a no-op on the CPU).
    """

    def __init__(self, module: fx.GraphModule, sync: Callable[[], None] | None = None) -> None:
        super().__init__(module, garbage_collect_values=True)
        self._sync = sync
        self.times_ms: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in _UNTIMED_NODE_OPS:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if self._sync is not None:
            self._sync()
        start = time.perf_counter()
        result = getattr(self, n.op)(n.target, args, kwargs)
        if self._sync is not None:
            self._sync()
        self.times_ms[n.name] = (time.perf_counter() - start) * 1e3
        return result


class TorchRunnable(Runnable):
    """A module and its input, run eagerly under `torch.inference_mode()`."""

    def __init__(self, module: nn.Module, example_input: torch.Tensor, threads: int) -> None:
        self.module = module
        self.example_input = example_input
        self.threads = threads

    def _pin_threads(self) -> None:
        # torch's thread count is process-wide; re-pin in case other code changed it since prepare().
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def run(self) -> None:
        with torch.inference_mode():
            self.module(self.example_input)

    def timed_runs(self, number: int) -> float:
        self._pin_threads()
        # One inference_mode context around the loop keeps its enter/exit cost out of the forward time.
        with torch.inference_mode():
            self.synchronize()
            start = time.perf_counter()
            for _ in range(number):
                self.module(self.example_input)
            self.synchronize()
            return (time.perf_counter() - start) * 1e3 / number

    def run_layerwise(self) -> dict[str, float]:
        if not isinstance(self.module, fx.GraphModule):
            raise TypeError("per-layer timing in context needs a torch.fx.GraphModule (build it from the IR)")
        self._pin_threads()
        interpreter = LayerTimingInterpreter(self.module, sync=self._layer_sync())
        with torch.inference_mode():
            interpreter.run(self.example_input)
        return interpreter.times_ms

    def _layer_sync(self) -> Callable[[], None] | None:
        return None


class TorchCpuBackend(Backend):
    """Eager PyTorch, CPU, `torch.set_num_threads(threads)`."""

    name = "torch-cpu"
    dtypes = ("float32", "bfloat16")
    supports_layerwise = True

    @staticmethod
    def is_available() -> bool:
        return True

    def prepare(self, module: nn.Module | Network, example_input: torch.Tensor | None = None) -> Runnable:
        torch.set_num_threads(self.threads)
        built = self.as_module(module).to(dtype=self.torch_dtype())
        example = self.default_input(module, example_input).to(dtype=self.torch_dtype())
        return TorchRunnable(built, example, self.threads)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "torch": torch.__version__,
            "num_threads": self.threads,
            "num_interop_threads": torch.get_num_interop_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
        }
