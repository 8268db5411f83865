"""Where layers' weights spill, and what it costs: single layers timed alone.

Dense 3x3 convolutions at 7x7 and 14x14, 1x1 convolutions at 7x7 and linear layers at batch 1, each
of widths whose weights run from a few MB to well past this machine's last-level cache
(`profiler.environment.last_level_cache_kb`) or the block size past which its C library maps every
allocation afresh (`profiler.environment.fresh_mapping_kb`), whichever is smaller. Each layer is
built and called on its own in this process, 1 thread, `inference_mode`, freed memory retained, and
timed `--repeats` times after a warm-up; the median is reported with its GMACs/s (a linear layer's
MB of weights per ms) and the page faults a timed call took, beside the layer's weights relative to
the spill point, so the cliff the predictor's price per spilled weight describes
(`lpnet.predictor.model`) can be read off any machine. Whether a copy past the mapping threshold
is mapped afresh depends on the freed blocks earlier layers left: the page faults tell.

    python -m bench.spill_point [--repeats 15] [--output bench/results/spill_point.json]
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import torch
from torch import nn

from bench.memory_format import median_ms
from bench.results_file import save_figures
from lpnet.predictor.model import LPNetConfig
from profiler.environment import fresh_mapping_kb, last_level_cache_kb, retain_freed_memory

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
    """One layer's median time alone, its work rate, its weights and its page faults per call."""
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
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ms = median_ms(module.eval(), x, repeats)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    rate = weights_mb / ms if kind == "linear" else macs / ms / 1e6
    return {
        "kind": kind,
        "side": side,
        "channels": channels,
        "weights_mb": round(weights_mb, 2),
        "ms": round(ms, 3),
        "rate": round(rate, 2),
        # Over the warm-up calls and the timed ones.
        "page_faults_per_call": round(faults / (repeats + 3), 1),
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
    config = LPNetConfig(last_level_cache_kb=last_level_cache_kb(), fresh_mapping_kb=fresh_mapping_kb())
    spill_mb = config.spill_kb / 1024 if config.spill_kb is not None else None
    print(
        f"last-level cache {config.last_level_cache_kb} KB, fresh mappings past {config.fresh_mapping_kb} KB: "
        f"spill point {spill_mb} MB"
    )
    rows = []
    for kind, kernel, side, widths in CASES:
        for channels in widths:
            row = time_layer(kind, kernel, side, channels, args.repeats)
            row["weights_over_spill_point"] = (
                round(float(row["weights_mb"]) / spill_mb, 3) if spill_mb else None
            )
            unit = "MB/ms" if kind == "linear" else "GMACs/s"
            print(
                f"{kind:8s} {side:3d}px {channels:5d} ch  {row['weights_mb']:7.1f} MB "
                f"({row['weights_over_spill_point']} of the spill point)  {row['ms']:9.2f} ms  "
                f"{row['rate']:6.1f} {unit}  {row['page_faults_per_call']:8.1f} faults/call",
                flush=True,
            )
            rows.append(row)
    save_figures(
        args.output,
        {
            "last_level_cache_kb": config.last_level_cache_kb,
            "fresh_mapping_kb": config.fresh_mapping_kb,
            "repeats": args.repeats,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
