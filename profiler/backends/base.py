"""The backend contract and its registry.

A backend turns a module (or an IR network) plus an example input into a `Runnable`: something
that runs exactly one forward per call. The timing protocol owns the clock; a backend only decides
how one forward runs and how to wait for it to finish. Backends register by name with a lazy
import path, so listing them never imports onnxruntime or initialises CUDA.
"""

from __future__ import annotations

import importlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from profiler.errors import BackendUnavailable, InvalidDeviceSpec, UnknownBackend, UnsupportedMeasurement

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lpnet.arch.ir import Network

DTYPES = ("float32", "float16", "bfloat16")


class Runnable(ABC):
    """One prepared forward pass."""

    @abstractmethod
    def run(self) -> None:
        """Run one forward. May return before the device finishes; see `synchronize`."""

    def synchronize(self) -> None:  # noqa: B027 - a no-op is right for synchronous backends
        """Block until every forward issued so far has finished (a no-op on synchronous backends)."""

    def timed_runs(self, number: int) -> float:
        """Run `number` forwards back to back; milliseconds per forward.

        Backends with their own clock (CUDA events) override this.
        """
        self.synchronize()
        start = time.perf_counter()
        for _ in range(number):
            self.run()
        self.synchronize()
        return (time.perf_counter() - start) * 1e3 / number

    def run_layerwise(self) -> dict[str, float]:
        """Run one forward timing every graph node in context; milliseconds per node name."""
        raise UnsupportedMeasurement(f"{type(self).__name__} cannot time layers in context")

    def close(self) -> None:  # noqa: B027 - optional hook, most runnables hold nothing to release
        """Release what the runnable holds (sessions, device memory)."""


class Backend(ABC):
    """A way of running a network on this machine with fixed settings."""

    name: ClassVar[str]
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    supports_layerwise: ClassVar[bool] = False
    # Runs on this machine's CPU, so the speed probe (profiler.speed) sees the speed it runs at.
    runs_on_cpu: ClassVar[bool] = True

    def __init__(self, threads: int = 1, dtype: str = "float32") -> None:
        cpu_count = os.cpu_count() or 1
        if not 1 <= threads <= cpu_count:
            raise InvalidDeviceSpec(
                f"threads={threads} is out of range for backend {self.name!r}: valid range is 1..{cpu_count} "
                f"(os.cpu_count() on this machine)",
                {"field": "threads", "value": threads, "min": 1, "max": cpu_count},
            )
        if dtype not in self.dtypes:
            raise InvalidDeviceSpec(
                f"dtype {dtype!r} is not supported by backend {self.name!r}; valid choices: {', '.join(self.dtypes)}",
                {"field": "dtype", "value": dtype, "valid": list(self.dtypes)},
            )
        self.threads = threads
        self.dtype = dtype

    @abstractmethod
    def prepare(self, module: nn.Module | Network, example_input: torch.Tensor | None = None) -> Runnable:
        """Make `module` ready to run on `example_input` (built from the network's input shape if None)."""

    def settings(self) -> dict[str, Any]:
        """Backend settings worth storing with a run (threads, library versions)."""
        return {"backend": self.name, "threads": self.threads, "dtype": self.dtype}

    # Shared helpers ------------------------------------------------------------------------------

    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

    @staticmethod
    def as_module(module: nn.Module | Network) -> nn.Module:
        """An eval-mode module: `module` itself, or the module built from an IR network."""
        from lpnet.arch.ir import Network

        if isinstance(module, Network):
            from lpnet.arch.build import build_module

            return build_module(module)
        return module.eval()

    @staticmethod
    def default_input(module: nn.Module | Network, example_input: torch.Tensor | None) -> torch.Tensor:
        import torch

        from lpnet.arch.ir import Network

        if example_input is not None:
            return example_input
        if isinstance(module, Network):
            return torch.randn(*module.input_shape)
        raise ValueError("an example input is needed to prepare a plain nn.Module")


# Registry ----------------------------------------------------------------------------------------

BackendFactory = Callable[..., Backend]

# name -> "module:attribute", imported on first use.
_REGISTRY: dict[str, str | BackendFactory] = {
    "torch-cpu": "profiler.backends.torch_cpu:TorchCpuBackend",
    "onnxruntime-cpu": "profiler.backends.onnxruntime_cpu:OnnxRuntimeCpuBackend",
    "torch-cuda": "profiler.backends.torch_cuda:TorchCudaBackend",
}


def register_backend(name: str, factory: str | BackendFactory) -> None:
    """Register a backend under `name`: a class/callable or a lazy "module:attribute" path."""
    _REGISTRY[name] = factory


def registered_backends() -> list[str]:
    """Every registered backend name, usable here or not."""
    return sorted(_REGISTRY)


def _factory(name: str) -> BackendFactory:
    if name not in _REGISTRY:
        raise UnknownBackend(name, registered_backends(), available_backends())
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module_name, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attribute)
        _REGISTRY[name] = entry
    return entry


def available_backends() -> list[str]:
    """Backend names that can run on this machine (their packages import and their device exists)."""
    usable = []
    for name in sorted(_REGISTRY):
        try:
            factory = _factory(name)
        except ImportError:
            continue
        check = getattr(factory, "is_available", None)
        if check is None or check():
            usable.append(name)
    return usable


def get_backend(name: str, threads: int = 1, dtype: str = "float32", **options: Any) -> Backend:
    """Instantiate the backend registered as `name`.

    Raises:
        UnknownBackend: `name` is not registered; the message lists the valid choices.
        BackendUnavailable: the backend cannot run on this machine.
        InvalidDeviceSpec: `threads` or `dtype` are out of range for this machine or backend.
    """
    try:
        factory = _factory(name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} cannot be imported here ({exc}); install its package or choose one of "
            f"{', '.join(available_backends())}",
            {"backend": name},
        ) from exc
    return factory(threads=threads, dtype=dtype, **options)


def describe_backends() -> Mapping[str, bool]:
    """Every registered backend name and whether it is usable on this machine."""
    usable = set(available_backends())
    return {name: name in usable for name in registered_backends()}
