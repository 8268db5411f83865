"""How a first-run predictor prices generated networks none of its members saw, from profiles alone.

Cross-fits LPNet on each profile cache as the service does (five members, each fitted without one
fold; latencies at the profile's nominal probe time) and judges every generated profiling network
by the member that never saw it: whole networks within +-10 % and +-5 % and their RMSPE, and, for
the networks timed in context, every layer's price against its in-context time, summed per layer
shape (rate kind; a convolution's kernel size and stride; a pool's global or windowed reduction).

Nothing is timed, so it runs beside nothing heavy but needs no labels: a development signal for
predictor design that never touches the evaluation sets. Each generated profiling network is an
architecture of its own and goes whole into one fold, so a held-out one is as unseen as a user's;
its label is one profile timing, not the median of fresh processes (`bench.unseen_accuracy`).

    python -m bench.held_out_prices profile_a.jsonl profile_b.jsonl --output held_out.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.predictor_accuracy import load
from bench.results_file import save_figures
from lpnet.arch.ir import Layer, Op
from lpnet.predictor.features import OP_CLASS, layer_rate_kind, tensorize
from lpnet.predictor.metrics import accuracy_metrics
from lpnet.predictor.model import LPNetConfig
from lpnet.predictor.samples import GENERATED_FAMILIES, NetworkSample, merge_replicates
from lpnet.predictor.train import TrainConfig, fit_cross_validated

RESULTS = Path(__file__).resolve().parent / "results"


def layer_shape(layer: Layer) -> str:
    """The rate kind; a convolution's kernel size (1, 3, 5, 7 or more) and stride; a pool's window."""
    kind = layer_rate_kind(layer)
    if layer.op is Op.CONV2D:
        return f"{kind}/k{min(max(layer.kernel), 7)}/s{2 if max(layer.stride) > 1 else 1}"
    if OP_CLASS[layer.op] == "pool":
        return f"{kind}/{'global' if layer.out_hw == (1, 1) else 'window'}"
    return kind


def _generated(sample: NetworkSample) -> bool:
    return (sample.family or sample.network.family) in GENERATED_FAMILIES


def held_out_prices(
    samples: Sequence[NetworkSample], config: LPNetConfig, train: TrainConfig
) -> dict[str, Any]:
    """Whole-network errors and per-shape layer prices of the generated networks, each priced by the
    member fitted without it."""
    fit = fit_cross_validated(samples, config, train)
    model = fit.predictor.model
    networks: list[dict[str, Any]] = []
    shapes: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # pred, meas, |err|, n
    for index, member, predicted in zip(fit.held_out, fit.held_out_member, fit.held_out_ms, strict=True):
        sample = samples[index]
        if not _generated(sample):
            continue
        networks.append(
            {
                "network": sample.group,
                "measured_ms": sample.latency_ms,
                "predicted_ms": predicted,
                "in_context": sample.per_layer_ms is not None,
            }
        )
        if not sample.per_layer_ms:
            continue
        tn = tensorize(sample.network, with_groups=False)
        with torch.no_grad():
            layer_ms = model.member_layer_ms(tn.layer_features(torch.zeros(1, 0)), tn.ops)[member, 0]
        for layer, price in zip(sample.network.layers, layer_ms.tolist(), strict=True):
            measured = sample.per_layer_ms.get(layer.name)
            if measured:
                row = shapes[layer_shape(layer)]
                row[0] += price
                row[1] += measured
                row[2] += abs(price - measured)
                row[3] += 1
    metrics = accuracy_metrics(
        np.array([n["predicted_ms"] for n in networks]), np.array([n["measured_ms"] for n in networks])
    )
    total = sum(row[1] for row in shapes.values()) or 1.0
    return {
        "generated_networks": len(networks),
        "within_10": round(metrics.within_10pct * len(networks)),
        "within_5": round(metrics.within_5pct * len(networks)),
        "rmspe": metrics.rmspe,
        "networks": networks,
        "shapes": {
            shape: {
                "layers": int(n),
                "price_over_time": p / m,
                "share_of_time": m / total,
                "share_of_absolute_error": err / total,
            }
            for shape, (p, m, err, n) in sorted(shapes.items(), key=lambda item: -item[1][2])
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("caches", nargs="+", type=Path, help="profile caches (JSONL) to cross-fit on")
    parser.add_argument("--hidden", type=int, default=LPNetConfig().hidden)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--fit-seed", type=int, default=0)
    parser.add_argument("--shapes", type=int, default=15, help="layer shapes to print, worst first")
    parser.add_argument("--output", type=Path, default=RESULTS / "held_out_prices.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = LPNetConfig(hidden=args.hidden)
    train = TrainConfig(steps=args.steps, seed=args.fit_seed)
    figures: dict[str, Any] = {"config": config.to_dict(), "steps": args.steps, "fit_seed": args.fit_seed}
    within = count = 0
    for cache in args.caches:
        result = held_out_prices(merge_replicates(load(cache, "probe").samples), config, train)
        figures[cache.name] = result
        within += result["within_10"]
        count += result["generated_networks"]
        print(
            f"\n{cache.name}: {result['within_10']} of {result['generated_networks']} held-out generated "
            f"networks within +-10 % ({result['within_5']} within +-5 %), RMSPE {100 * result['rmspe']:.1f} %"
        )
        for shape, row in list(result["shapes"].items())[: args.shapes]:
            print(
                f"  {shape:28s} {row['layers']:5d} layers  price/time {row['price_over_time']:5.2f}  "
                f"{100 * row['share_of_time']:5.1f} % of the time, |error| {100 * row['share_of_absolute_error']:4.1f} %"
            )
    figures["within_10"] = {"networks": count, "within": within}
    print(f"\nall: {within} of {count} within +-10 %")
    save_figures(args.output, figures)


if __name__ == "__main__":
    main()
