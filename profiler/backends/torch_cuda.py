"""Eager PyTorch on a CUDA GPU, timed with CUDA events."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from profiler.backends.base import Backend, Runnable
from profiler.backends.torch_cpu import TorchRunnable
from profiler.errors import BackendUnavailable

if TYPE_CHECKING:
    from torch import nn

    from lpnet.arch.ir import Network


class CudaRunnable(TorchRunnable):
    """A module on the GPU; forwards are timed between CUDA events, not on the host clock."""

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def timed_runs(self, number: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.inference_mode():
            torch.cuda.synchronize()
            start.record()
            for _ in range(number):
                self.module(self.example_input)
            end.record()
            end.synchronize()
        return float(start.elapsed_time(end)) / number

    def _layer_sync(self) -> Callable[[], None] | None:
        # Per-node host timing on a GPU is only meaningful if each kernel has finished.
        return torch.cuda.synchronize

    def close(self) -> None:
        self.module = self.module.cpu()
        torch.cuda.empty_cache()


class TorchCudaBackend(Backend):
    """Eager PyTorch on `cuda:{device_index}`; `threads` only bounds host-side CPU work."""

    name = "torch-cuda"
    dtypes = ("float32", "float16", "bfloat16")
    supports_layerwise = True
    runs_on_cpu = False

    def __init__(self, threads: int = 1, dtype: str = "float32", device_index: int = 0) -> None:
        if not self.is_available():
            raise BackendUnavailable(
                "backend 'torch-cuda' needs a CUDA GPU, but torch.cuda.is_available() is False here; "
                "use 'torch-cpu' or 'onnxruntime-cpu' on this machine",
                {"backend": self.name},
            )
        super().__init__(threads=threads, dtype=dtype)
        if not 0 <= device_index < torch.cuda.device_count():
            raise BackendUnavailable(
                f"cuda:{device_index} does not exist; this machine has {torch.cuda.device_count()} GPU(s)",
                {"backend": self.name, "device_index": device_index},
            )
        self.device = torch.device("cuda", device_index)

    @staticmethod
    def is_available() -> bool:
        return bool(torch.cuda.is_available())

    def prepare(self, module: nn.Module | Network, example_input: torch.Tensor | None = None) -> Runnable:
        torch.set_num_threads(self.threads)
        built = self.as_module(module).to(device=self.device, dtype=self.torch_dtype())
        example = self.default_input(module, example_input).to(device=self.device, dtype=self.torch_dtype())
        return CudaRunnable(built, example, self.threads)

    def settings(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        return {
            **super().settings(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": props.name,
            "gpu_memory_mb": props.total_memory // 2**20,
            "cudnn": torch.backends.cudnn.version(),
        }
