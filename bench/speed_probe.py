"""Does the speed probe make network latencies repeat? Milliseconds against probe ratios.

For each family, a few fixed width vectors are built afresh and measured in several rounds, the
vectors interleaved within a round, each measurement through the profiler's own
`measure_network` with the speed probe (profiler.speed). Every measurement gives both figures from
the same samples: the median milliseconds and the median ratio to the probe. Reported per vector:
(max - min) / median over the rounds, for each figure; and the probe's own median per measurement,
which shows how much the machine's speed moved meanwhile.

It also gives the repeatability ceiling of a latency predictor judged on single measurements: the
share of measurements within +-5 % and +-10 % of the median of the *other* rounds of the same
vector. A predictor that knew each network's typical latency exactly would score about that
against labels measured like these; no predictor can do much better.

    python -m bench.speed_probe                     # three families, 4 rounds, ~5 min at 1 thread
    python -m bench.speed_probe --rounds 6 --families resnet18

Saves bench/results/speed_probe.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lpnet.arch.from_torch import network_from_torchvision
from profiler.backends.base import get_backend
from profiler.environment import collect_environment, retain_freed_memory
from profiler.measure import measure_network
from profiler.protocol import TimingProtocol
from profiler.speed import PROBE_VERSION, SpeedProbe
from profiler.variants import width_variants

RESULTS = Path(__file__).parent / "results"
# The protocol of bench/predictor_accuracy.py: what a profile runs.
PROTOCOL = TimingProtocol(min_repeat_ms=300, min_repetitions=10, target_precision=0.02, max_seconds=4)


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def share_near_the_others(per_vector: list[list[float]], tolerance: float) -> float:
    """Share of measurements within `tolerance` of the median of the other rounds of their vector."""
    hits = total = 0
    for values in per_vector:
        for i, value in enumerate(values):
            others = values[:i] + values[i + 1 :]
            if others:
                total += 1
                hits += abs(value / statistics.median(others) - 1.0) <= tolerance
    return hits / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default="resnet18,mobilenet_v2,resnet50")
    parser.add_argument("--vectors", type=int, default=3, help="width vectors per family")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", type=Path, default=RESULTS / "speed_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    backend = get_backend("torch-cpu", threads=1)
    probe = SpeedProbe()
    families: dict[str, Any] = {}
    for family in args.families.split(","):
        network = network_from_torchvision(family)
        # Random width vectors (the first two of width_variants are the full and smallest widths).
        vectors = width_variants(network, args.vectors + 2, seed=7)[2:]
        ms: list[list[float]] = [[] for _ in vectors]
        relative: list[list[float]] = [[] for _ in vectors]
        probes: list[list[float]] = [[] for _ in vectors]
        for round_ in range(args.rounds):
            for index, widths in enumerate(vectors):
                result = measure_network(network, backend, PROTOCOL, width_vector=widths, probe=probe.run)
                assert result.relative is not None and result.probe_ms is not None
                ms[index].append(result.median_ms)
                relative[index].append(result.relative)
                probes[index].append(result.probe_ms)
                print(
                    f"{family} vector {index} round {round_}: {result.median_ms:.2f} ms, "
                    f"{result.relative:.3f} probes (probe {result.probe_ms:.3f} ms)",
                    flush=True,
                )
        families[family] = {
            "width_vectors": vectors,
            "median_ms": ms,
            "relative": relative,
            "probe_ms": probes,
            "ms_spread": [spread(v) for v in ms],
            "relative_spread": [spread(v) for v in relative],
        }
        print(
            f"{family}: spread over rounds, ms {[round(s, 3) for s in families[family]['ms_spread']]}, "
            f"probe ratio {[round(s, 3) for s in families[family]['relative_spread']]}"
        )
    all_ms = [s for f in families.values() for s in f["ms_spread"]]
    all_relative = [s for f in families.values() for s in f["relative_spread"]]
    all_probes = [p for f in families.values() for v in f["probe_ms"] for p in v]
    summary = {
        "median_ms_spread": statistics.median(all_ms),
        "median_relative_spread": statistics.median(all_relative),
        "max_ms_spread": max(all_ms),
        "max_relative_spread": max(all_relative),
        "probe_ms_min": min(all_probes),
        "probe_ms_median": statistics.median(all_probes),
        "probe_ms_max": max(all_probes),
    }
    for figure in ("median_ms", "relative"):
        vectors = [v for f in families.values() for v in f[figure]]
        for tolerance in (0.05, 0.10):
            key = f"{figure}_within_{round(tolerance * 100)}pct_of_other_rounds"
            summary[key] = share_near_the_others(vectors, tolerance)
    print(json.dumps(summary, indent=2))
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": collect_environment().model_dump(mode="json"),
        "protocol": PROTOCOL.model_dump(),
        "probe_version": PROBE_VERSION,
        "rounds": args.rounds,
        "summary": summary,
        "families": families,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
