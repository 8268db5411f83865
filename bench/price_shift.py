"""How a change of profiling material moves a predictor's prices: two profiles, the same networks.

LPNet is fitted on each of two profile caches (`bench.unseen_accuracy`'s JSONL) as that bench fits
them (probe-speed labels, fit seed 0), and both predict the same torchvision models. The table gives,
per model, each fit's total and, per rate kind (an operator, and a convolution by its kernel kind),
the milliseconds each fit gives that kind's layers and their ratio, for the kinds that carry at least
2 % of the model's time. Nothing is timed: it says which prices moved, not which fit is right
(`bench.unseen_accuracy` and `bench.operator_pricing` judge against timings).

    python -m bench.price_shift --base a.jsonl --other b.jsonl --models vgg11 vit_b_16

Writes `bench/results/price_shift.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.predictor_accuracy import fit_profiled, load
from lpnet.arch.from_torch import network_from_torchvision
from lpnet.predictor.features import layer_rate_kind

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = (
    "vgg11",
    "alexnet",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "vit_b_16",
    "swin_t",
    "resnet18",
)
# Kinds carrying less of a model's predicted time than this are left out of the table.
MIN_SHARE = 0.02


def kind_prices(cache: Path, models: list[str], steps: int) -> dict[str, dict[str, Any]]:
    """Per model, one fit's total, network overhead and predicted milliseconds per rate kind."""
    profile = load(cache, "probe")
    predictor = fit_profiled(profile.samples, steps)
    prices: dict[str, dict[str, Any]] = {}
    for name in models:
        network = network_from_torchvision(name)
        layers = {layer.name: layer for layer in network.layers}
        prediction = predictor.predict(network)
        kinds: Counter[str] = Counter()
        for layer in prediction.per_layer:
            kinds[layer_rate_kind(layers[layer.name])] += layer.ms
        prices[name] = {
            "total": prediction.total_ms,
            "overhead": prediction.overhead_ms,
            "kinds": dict(kinds),
        }
    return prices


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="the profile cache prices are compared to")
    parser.add_argument("--other", type=Path, required=True, help="the profile cache whose prices moved")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--output", type=Path, default=RESULTS / "price_shift.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = kind_prices(args.base, args.models, args.steps)
    other = kind_prices(args.other, args.models, args.steps)
    for name in args.models:
        print(f"{name}: {base[name]['total']:.1f} -> {other[name]['total']:.1f} ms")
        kinds = sorted(
            set(base[name]["kinds"]) | set(other[name]["kinds"]),
            key=lambda k: -other[name]["kinds"].get(k, 0),
        )
        for kind in kinds:
            before, after = base[name]["kinds"].get(kind, 0.0), other[name]["kinds"].get(kind, 0.0)
            if max(before, after) >= MIN_SHARE * other[name]["total"]:
                ratio = f"{after / before:.2f}" if before else "new"
                print(f"  {kind:24} {before:9.2f} {after:9.2f}  {ratio}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "base": args.base.name,
                "other": args.other.name,
                "steps": args.steps,
                "base_prices": base,
                "other_prices": other,
            },
            indent=1,
        )
    )
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
