"""How much a layer's time depends on the memory format of its input: contiguous NCHW or channels-last.

A layer norm over channels computed channels-last (permute, normalise, permute back), as ConvNeXt,
Swin and the IR's `layernorm` compute it, hands the next layer an NCHW view with channels-last
strides, and PyTorch then runs that layer (and what follows it) channels-last. The predictor has no
feature for the memory format. For a few convolutions and activations of the sizes transformers and
CNNs use, this times the same module on both formats in one process, 1 thread, alternating rounds,
and reports channels-last over NCHW.

    python -m bench.memory_format [--rounds 4] [--repeats 30]

Writes `bench/results/memory_format.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.results_file import save_figures
from profiler.environment import retain_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"
# (name, module, input channels, input side)
CASES: tuple[tuple[str, Callable[[], nn.Module], int, int], ...] = (
    ("dense 3x3 64->64 at 112", lambda: nn.Conv2d(64, 64, 3, padding=1), 64, 112),
    ("dense 3x3 256->256 at 28", lambda: nn.Conv2d(256, 256, 3, padding=1), 256, 28),
    ("dense 3x3 512->512 at 14", lambda: nn.Conv2d(512, 512, 3, padding=1), 512, 14),
    ("pointwise 96->384 at 56", lambda: nn.Conv2d(96, 384, 1), 96, 56),
    ("pointwise 384->96 at 56", lambda: nn.Conv2d(384, 96, 1), 384, 56),
    ("pointwise 768->3072 at 14", lambda: nn.Conv2d(768, 3072, 1), 768, 14),
    ("depthwise 7x7 96 at 56", lambda: nn.Conv2d(96, 96, 7, padding=3, groups=96), 96, 56),
    ("gelu 96 at 56", nn.GELU, 96, 56),
    ("hardswish 96 at 56", nn.Hardswish, 96, 56),
    ("silu 96 at 56", nn.SiLU, 96, 56),
)


def median_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        module(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of both formats per case")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per round; their median counts")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory_format.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    rows = []
    with torch.inference_mode():
        for name, make, channels, side in CASES:
            module = make().eval()
            contiguous = torch.randn(1, channels, side, side)
            channels_last = contiguous.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
            nchw, last = [], []
            for _ in range(args.rounds):
                nchw.append(median_ms(module, contiguous, args.repeats))
                last.append(median_ms(module, channels_last, args.repeats))
            ratio = statistics.median(last) / statistics.median(nchw)
            rows.append({"layer": name, "nchw_ms": nchw, "channels_last_ms": last, "ratio": ratio})
            print(
                f"{name:28} NCHW {statistics.median(nchw):8.3f} ms  channels-last {statistics.median(last):8.3f} ms  {ratio:.2f}"
            )
    save_figures(args.output, {"rounds": args.rounds, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
