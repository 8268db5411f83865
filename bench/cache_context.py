"""How much a small layer's time depends on what ran before it: the traffic that evicted its caches.

A layer timed in context pays for fetching again whatever the layers before it pushed out of the
caches: its kernel's code, the interpreter's and the dispatcher's data, its module's attributes.
For a large layer that is noise; for a small one (a batch norm, an activation or a pool on a 7x7
map) it can be most of its time, so the same layer costs several times more after a layer that
streams megabytes of weights than after a small one. The predictor prices a layer from its own
work only; this measures how far that leaves a small layer's time open.

Two parts, one process, 1 thread, freed memory retained:

- `streamed`: each small layer called once right after a sum over a buffer of S MB (S from 0 to
  64), the median over `--calls` calls, the sizes taken in turn so drift spreads over all of them;
- `in_network`: the final global average pool of resnet18 (512 x 7x7, after convolutions with 9 MB
  of weights and a forward of 47 MB) and of regnet_y_400mf (440 x 7x7, after 1 MB convolutions and
  a squeeze-excitation pool in every block), each timed in context (`profiler.measure`), beside
  the same pool called alone.

    python -m bench.cache_context [--calls 200]

Writes `bench/results/cache_context.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.memory_format import median_ms
from bench.results_file import save_figures
from lpnet.arch.from_torch import network_from_torchvision
from profiler.backends.base import get_backend
from profiler.environment import retain_freed_memory
from profiler.measure import measure_in_context
from profiler.protocol import TimingProtocol

RESULTS = Path(__file__).resolve().parent / "results"
STREAMED_MB = (0.0, 0.25, 1.0, 4.0, 16.0, 64.0)
# (name, module, input channels, input side)
SMALL_LAYERS: tuple[tuple[str, Callable[[], nn.Module], int, int], ...] = (
    ("global average pool 512 at 7", lambda: nn.AdaptiveAvgPool2d(1), 512, 7),
    ("batch norm 512 at 7", lambda: nn.BatchNorm2d(512), 512, 7),
    ("relu 512 at 7", nn.ReLU, 512, 7),
    ("batch norm 64 at 56", lambda: nn.BatchNorm2d(64), 64, 56),
)
IN_NETWORK = (("resnet18", "avgpool"), ("regnet_y_400mf", "avgpool"))


def streamed(calls: int) -> list[dict[str, object]]:
    """Median time of each small layer right after S MB streamed through the caches."""
    buffers = {mb: torch.randn(max(1, int(mb * 2**20 / 4))) for mb in STREAMED_MB}
    rows: list[dict[str, object]] = []
    for name, make, channels, side in SMALL_LAYERS:
        module = make().eval()
        x = torch.randn(1, channels, side, side)
        times: dict[float, list[float]] = {mb: [] for mb in STREAMED_MB}
        for _ in range(calls):
            for mb, buffer in buffers.items():
                if mb:
                    buffer.sum()
                started = time.perf_counter()
                module(x)
                times[mb].append(time.perf_counter() - started)
        medians = {mb: statistics.median(t) * 1e3 for mb, t in times.items()}
        rows.append({"layer": name, "ms_after_mb": {str(mb): ms for mb, ms in medians.items()}})
        print(
            f"{name:30} " + "  ".join(f"{mb:g} MB {ms * 1e3:6.1f} us" for mb, ms in medians.items()),
            flush=True,
        )
    return rows


def in_network(calls: int) -> list[dict[str, object]]:
    """The final pool of two networks timed in context, and the same pool called alone."""
    backend = get_backend("torch-cpu")
    protocol = TimingProtocol.budgeted()
    rows: list[dict[str, object]] = []
    for model, layer_name in IN_NETWORK:
        network = network_from_torchvision(model)
        layer = next(layer for layer in network.layers if layer.name == layer_name)
        timing = measure_in_context(network, backend, protocol)
        x = torch.randn(1, layer.in_channels, *layer.in_hw)
        alone = median_ms(nn.AdaptiveAvgPool2d(1), x, calls)
        in_context = timing.layers_ms[layer_name]
        rows.append(
            {
                "network": model,
                "layer": layer_name,
                "input": [layer.in_channels, *layer.in_hw],
                "in_context_ms": in_context,
                "alone_ms": alone,
                "network_ms": timing.network.median_ms,
            }
        )
        print(
            f"{model:16} {layer_name} {layer.in_channels}x{layer.in_hw[0]}x{layer.in_hw[1]}: in context "
            f"{in_context * 1e3:6.1f} us, alone {alone * 1e3:6.1f} us (network {timing.network.median_ms:.2f} ms)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200, help="timed calls per layer and size")
    parser.add_argument("--output", type=Path, default=RESULTS / "cache_context.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    with torch.inference_mode():
        streamed_rows = streamed(args.calls)
        network_rows = in_network(args.calls)
    save_figures(args.output, {"calls": args.calls, "streamed": streamed_rows, "in_network": network_rows})


if __name__ == "__main__":
    main()
