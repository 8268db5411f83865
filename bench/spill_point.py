"""Where layers' weights spill from the last-level cache, and what it costs: single layers timed alone.

Dense 3x3 convolutions at 7x7 and 14x14, 1x1 convolutions at 7x7 and linear layers at batch 1, each
of widths whose weights run from a few MB to well past this machine's last-level cache
(`profiler.environment.last_level_cache_kb`). Each layer is built and called on its own in this
process, 1 thread, `inference_mode`, freed memory retained, and timed `--repeats` times after a
warm-up; the median is reported with its GMACs/s (a linear layer's MB of weights per ms), beside the
layer's weights relative to the cache, so the cliff the predictor's price per spilled weight
describes (`lpnet.predictor.model`) can be read off any machine.

    python -m bench.spill_point [--repeats 15] [--output bench/results/spill_point.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from bench.memory_format import median_ms
from bench.results_file import save_figures
from profiler.environment import last_level_cache_kb, retain_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"
# (kind, kernel, map side, channel counts): square layers, in channels = out channels.
CASES: tuple[tuple[str, int, int, tuple[int, ...]], ...] = (
    ("conv3x3", 3, 7, (256, 512, 640, 768, 896, 960, 1024, 1152, 1280, 1536)),
    ("conv3x3", 3, 14, (256, 512, 768, 896, 960, 1024)),
    ("conv1x1", 1, 7, (1024, 2048, 2560, 2944, 3072, 4096)),
    ("linear", 0, 1, (2048, 2944, 3072, 4096, 6144, 8192)),
)


def time_layer(
    kind: str, kernel: int, side: int, channels: int, repeats: int
) -> dict[str, float | int | str]:
    """One layer's median time alone, its work rate and its weights."""
    if kind == "linear":
        module: nn.Module = nn.Linear(channels, channels, bias=False)
        x = torch.randn(1, channels)
        macs = channels * channels
    else:
        module = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False)
        x = torch.randn(1, channels, side, side)
        macs = channels * channels * kernel * kernel * side * side
    weights_mb = sum(p.numel() for p in module.parameters()) * 4 / 2**20
    with torch.inference_mode():
        ms = median_ms(module.eval(), x, repeats)
    rate = weights_mb / ms if kind == "linear" else macs / ms / 1e6
    return {
        "kind": kind,
        "side": side,
        "channels": channels,
        "weights_mb": round(weights_mb, 2),
        "ms": round(ms, 3),
        "rate": round(rate, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS / "spill_point.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(1)
    retain_freed_memory()
    cache_kb = last_level_cache_kb()
    cache_mb = cache_kb / 1024 if cache_kb is not None else None
    print(f"last-level cache: {cache_mb} MB")
    rows = []
    for kind, kernel, side, widths in CASES:
        for channels in widths:
            row = time_layer(kind, kernel, side, channels, args.repeats)
            row["weights_over_cache"] = round(float(row["weights_mb"]) / cache_mb, 3) if cache_mb else None
            unit = "MB/ms" if kind == "linear" else "GMACs/s"
            print(
                f"{kind:8s} {side:3d}px {channels:5d} ch  {row['weights_mb']:7.1f} MB "
                f"({row['weights_over_cache']} of the cache)  {row['ms']:9.2f} ms  {row['rate']:6.1f} {unit}",
                flush=True,
            )
            rows.append(row)
    save_figures(args.output, {"last_level_cache_kb": cache_kb, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
