"""W-Gates versus uniform, L1 and Taylor pruning on digits: accuracy against *measured* latency.

A small ResNet (widths 64/128/256, 16x16 upsampled digits, 1 thread) is trained, then pruned to
budgets that are shares of its measured latency:

- W-Gates (train mode): gates trained jointly with the network under LPNet's latency term for
  `--gate-epochs`, widths rounded under the budget and verified by measurement (<= 3 rounds),
  physical pruning, `--finetune-epochs` of fine-tuning.
- Baselines (uniform width, L1 global, L1 per layer, Taylor global): the largest keep ratio whose
  *measured* latency is at or under the same aim (budget * 0.97, as the verified W-Gates plans aim),
  found by bisection; physical pruning; `--gate-epochs + --finetune-epochs` of fine-tuning, so every
  method gets the same number of epochs after the base model.

Every final network is measured again separately; accuracy is on the 360 held-out digits (one
image is 0.28 %), so differences of a few tenths of a percent are noise: use `--seeds` to see the
spread. The predictor is fitted here on measured width variants of the network.

Timings on this machine (2 cores, 1 thread): `--quick` about 2-4 minutes; the default (15 base
epochs, 4 budgets, 5 methods, 3 + 5 epochs each) about 20-30 minutes per seed.

Run: `.venv/bin/python bench/wgates_digits.py --quick` (writes bench/results/wgates_digits*.json/png).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is bench/, where bench/profiler.py would shadow the profiler package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lpnet.arch.from_torch import network_from_module  # noqa: E402
from lpnet.arch.groups import apply_width_vector, channel_layout  # noqa: E402
from lpnet.arch.ir import Network  # noqa: E402
from lpnet.gates.budget import width_grid  # noqa: E402
from lpnet.gates.criteria import PruningCriterion, get_criterion, match_latency  # noqa: E402
from lpnet.gates.datasets import digits_loaders  # noqa: E402
from lpnet.gates.smallnet import SmallResNet, SmallResNetConfig  # noqa: E402
from lpnet.gates.training import (  # noqa: E402
    TrainPruneConfig,
    evaluate_accuracy,
    train_and_prune,
    train_epochs,
)
from lpnet.predictor.model import LPNetConfig  # noqa: E402
from lpnet.predictor.predict import LatencyPredictor  # noqa: E402
from lpnet.predictor.samples import NetworkSample  # noqa: E402
from lpnet.predictor.train import TrainConfig, fit_predictor  # noqa: E402
from lpnet.pruning import prune_module  # noqa: E402
from profiler.backends.base import get_backend  # noqa: E402
from profiler.protocol import TimingProtocol  # noqa: E402
from profiler.tasks import measure_network  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("uniform", "l1-global", "l1-layer", "taylor")
CHECK_PROTOCOL = TimingProtocol(
    warmup_runs=5, warmup_ms=50, min_repeat_ms=300, min_repetitions=20, target_precision=0.02, max_seconds=5.0
)
VERIFY_MARGIN = 0.03


def make_measure(protocol: TimingProtocol) -> Any:
    backend = get_backend("torch-cpu", threads=1)

    def measure(network: Network) -> float:
        return measure_network(network, backend, protocol).median_ms

    return measure


def fit_digits_predictor(network: Network, variants: int, steps: int, seed: int) -> LatencyPredictor:
    """LPNet fitted on measured width variants of the digits network (quick protocol).

    Half the variants scale every group by a common share (+-30 %), half draw each group's width
    independently: planners visit unbalanced width vectors, and a predictor that has only seen
    balanced ones extrapolates there.
    """
    measure = make_measure(TimingProtocol.quick())
    layout = channel_layout(network)
    rng = random.Random(seed)
    samples = []
    for index in range(variants):
        if index == 0:
            widths = layout.full_widths
        elif index % 2:
            share = rng.uniform(0.1, 1.0)
            widths = [
                max(8, min(g.channels, 8 * round(rng.uniform(0.7, 1.3) * share * g.channels / 8)))
                for g in layout.groups
            ]
        else:
            widths = [8 * rng.randint(1, g.channels // 8) for g in layout.groups]
        pruned = apply_width_vector(network, widths)
        samples.append(NetworkSample(pruned, measure(pruned), family="digits-resnet"))
    torch.manual_seed(seed)
    return fit_predictor(samples, LPNetConfig(), TrainConfig(steps=steps, seed=seed))


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    data = digits_loaders(batch_size=64, image_size=args.image_size, seed=seed)
    config = SmallResNetConfig(in_channels=1, num_classes=10, widths=tuple(args.widths))
    base = SmallResNet(config)
    network = network_from_module(base, (1, *data.input_chw), name="digits-resnet", family="digits-resnet")
    started = time.perf_counter()
    train_epochs(base, data.train, args.base_epochs, learning_rate=0.05)
    base_accuracy = evaluate_accuracy(base, data.val)
    print(
        f"[seed {seed}] base model: accuracy {base_accuracy:.4f} after {time.perf_counter() - started:.0f} s"
    )

    started = time.perf_counter()
    predictor = fit_digits_predictor(network, args.variants, args.fit_steps, seed)
    print(
        f"[seed {seed}] predictor from {args.variants} measured variants in {time.perf_counter() - started:.0f} s"
    )
    measure = make_measure(CHECK_PROTOCOL)
    unpruned_ms = measure(network)
    grid = width_grid(channel_layout(network))
    rows: list[dict[str, Any]] = [
        {
            "seed": seed,
            "method": "unpruned",
            "share": 1.0,
            "budget_ms": unpruned_ms,
            "measured_ms": unpruned_ms,
            "accuracy": base_accuracy,
            "widths": grid.full_widths,
        }
    ]
    print(
        f"[seed {seed}] unpruned: {unpruned_ms:.3f} ms measured, {predictor.predict(network).total_ms:.3f} predicted"
    )
    epochs = args.gate_epochs + args.finetune_epochs
    for share in args.budgets:
        budget = share * unpruned_ms
        started = time.perf_counter()
        outcome = train_and_prune(
            base,
            network,
            predictor,
            budget,
            data.train,
            data.val,
            TrainPruneConfig(
                gate_epochs=args.gate_epochs,
                finetune_epochs=args.finetune_epochs,
                learning_rate=args.learning_rate,
                verify_margin=VERIFY_MARGIN,
                seed=seed,
            ),
            measure=measure,
        )
        rows.append(
            {
                "seed": seed,
                "method": "w-gates",
                "share": share,
                "budget_ms": budget,
                "measured_ms": measure(outcome.pruned.network),
                "accuracy": outcome.accuracy_after,
                "accuracy_gated": outcome.accuracy_gated,
                "accuracy_pruned": outcome.accuracy_pruned,
                "widths": outcome.plan.widths,
                "rounds": [r.measured_ms for r in outcome.plan.rounds],
                "seconds": time.perf_counter() - started,
            }
        )
        _print_row(rows[-1])
        for name in args.methods:
            started = time.perf_counter()
            criterion: PruningCriterion = (
                get_criterion(name, batches=data.train, max_batches=8)
                if name == "taylor"
                else get_criterion(name)
            )
            selection, _ = match_latency(
                criterion, base, network, grid, measure, budget * (1 - VERIFY_MARGIN), iterations=8
            )
            pruned = prune_module(base, network, selection.widths, selection.kept_indices)
            accuracy_pruned = evaluate_accuracy(pruned.module, data.val)
            train_epochs(pruned.module, data.train, epochs, learning_rate=args.learning_rate)
            rows.append(
                {
                    "seed": seed,
                    "method": name,
                    "share": share,
                    "budget_ms": budget,
                    "measured_ms": measure(pruned.network),
                    "accuracy": evaluate_accuracy(pruned.module, data.val),
                    "accuracy_pruned": accuracy_pruned,
                    "ratio": selection.ratio,
                    "widths": selection.widths,
                    "seconds": time.perf_counter() - started,
                }
            )
            _print_row(rows[-1])
    return rows


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"  {row['share']:.2f} {row['method']:>10}: measured {row['measured_ms']:.3f} ms "
        f"(budget {row['budget_ms']:.3f}) accuracy {row['accuracy']:.4f} widths {row['widths']} "
        f"[{row.get('seconds', 0):.0f} s]",
        flush=True,
    )


def summarise(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Mean accuracy and measured latency per method and budget, and W-Gates' margin over the best baseline."""
    summary: dict[str, Any] = {}
    shares = sorted({r["share"] for r in rows if r["method"] != "unpruned"})
    for share in shares:
        per_method: dict[str, Any] = {}
        for method in ["w-gates", *methods]:
            subset = [r for r in rows if r["share"] == share and r["method"] == method]
            accuracies = [r["accuracy"] for r in subset]
            per_method[method] = {
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "measured_ms_mean": statistics.mean(r["measured_ms"] for r in subset),
                "over_budget": sum(r["measured_ms"] > r["budget_ms"] for r in subset),
            }
        best = max(methods, key=lambda m: per_method[m]["accuracy_mean"])
        per_method["w-gates_minus_best_baseline"] = {
            "best_baseline": best,
            "accuracy": per_method["w-gates"]["accuracy_mean"] - per_method[best]["accuracy_mean"],
        }
        summary[f"{share:.2f}"] = per_method
    return summary


def plot(rows: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = {
        "w-gates": "#2f6db5",
        "uniform": "#9aa5b1",
        "l1-global": "#e07b39",
        "l1-layer": "#d4a017",
        "taylor": "#3c9d5d",
    }
    unpruned = [r for r in rows if r["method"] == "unpruned"]
    for method in ["w-gates", *methods]:
        points = sorted((r["measured_ms"], r["accuracy"]) for r in rows if r["method"] == method)
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=method, color=colours.get(method))
    axes.scatter(
        [r["measured_ms"] for r in unpruned],
        [r["accuracy"] for r in unpruned],
        marker="*",
        s=120,
        color="black",
        label="unpruned",
    )
    axes.set_xlabel("measured latency (ms, torch CPU, 1 thread)")
    axes.set_ylabel("validation accuracy (360 digits)")
    axes.set_title("Digits SmallResNet: accuracy vs measured latency")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tag", help="suffix of the result files (default: '_quick' with --quick, else none)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer epochs, budgets and variants")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--base-epochs", type=int)
    parser.add_argument("--gate-epochs", type=int)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument(
        "--learning-rate", type=float, default=0.01, help="of the joint training and fine-tuning"
    )
    parser.add_argument("--budgets", type=float, nargs="+", help="shares of the unpruned measured latency")
    parser.add_argument("--variants", type=int, help="measured width variants for the predictor")
    parser.add_argument("--fit-steps", type=int)
    parser.add_argument("--methods", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    args = parser.parse_args()
    quick = args.quick
    args.base_epochs = args.base_epochs or (4 if quick else 15)
    args.gate_epochs = args.gate_epochs or (1 if quick else 3)
    args.finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else (1 if quick else 5)
    args.budgets = args.budgets or ([0.4, 0.7] if quick else [0.3, 0.45, 0.6, 0.8])
    args.variants = args.variants or (20 if quick else 40)
    args.fit_steps = args.fit_steps or (400 if quick else 1500)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} cores; latencies measured now are not representative"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ("_quick" if quick else "")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        rows += run_seed(args, seed)
    summary = summarise(rows, args.methods)
    total = time.perf_counter() - started
    print("\nsummary (mean over seeds):")
    for share, per_method in summary.items():
        margin = per_method["w-gates_minus_best_baseline"]
        cells = ", ".join(
            f"{m} {v['accuracy_mean']:.4f}@{v['measured_ms_mean']:.3f}ms"
            for m, v in per_method.items()
            if "accuracy_mean" in v
        )
        print(f"  budget {share}: {cells}; w-gates - {margin['best_baseline']} = {margin['accuracy']:+.4f}")
    print(f"bench took {total:.0f} s")
    report = {
        "settings": vars(args),
        "rows": rows,
        "summary": summary,
        "bench_seconds": total,
        "load_average_at_start": load,
    }
    (RESULTS / f"wgates_digits{suffix}.json").write_text(json.dumps(report, indent=2))
    plot(rows, args.methods, RESULTS / f"wgates_digits{suffix}.png")
    print(f"wrote {RESULTS / f'wgates_digits{suffix}.json'} and .png")


if __name__ == "__main__":
    main()
