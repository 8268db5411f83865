"""How far fine-tuning alone moves a pruned network's accuracy on distorted digits: the noise floor
under `wgates_digits`' comparisons.

Per seed, the base model is trained as `wgates_digits` trains it (same split, distortion and
epochs), pruned once by each criterion at one keep ratio (uniform and L1 per layer keep the same
widths, only the kept filters differ), and each pruned network is fine-tuned `--orders` times from
the same weights, each time with another order of the training batches (the only thing that
changes). Reported per method: the held-out accuracy of every run and its standard deviation; and
the differences between the two methods fine-tuned with the same order. From these spreads follows
the number of seeds at which two standard errors of a mean difference shrink to a given margin
(`seeds_for_margin`): what a benchmark on these 899 digits needs to tell two methods apart by that
much, from fine-tuning noise alone. Paired differences between methods that each drew their own
order carry both methods' spreads (`independent_order_difference_sd_images`; `wgates_digits` ran
so until it gave every method the same starting order), those between methods on the same order
carry the same-order spread.

No timing is involved, so it can run beside other work.
Run: `.venv/bin/python bench/finetune_noise.py` (writes bench/results/finetune_noise.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is bench/, where bench/profiler.py would shadow the profiler package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench.wgates_digits import restart_batch_order, train_base_model
from lpnet.arch.groups import channel_layout
from lpnet.gates.budget import width_grid
from lpnet.gates.criteria import get_criterion
from lpnet.gates.supervised import evaluate_accuracy, train_epochs
from lpnet.pruning import prune_module
from profiler.environment import collect_environment

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("uniform", "l1-layer")


def seeds_for_margin(difference_sd: float, margin: float, z: float = 2.0) -> int:
    """Seeds at which `z` standard errors of the mean difference equal `margin` (same units)."""
    return max(1, round((z * difference_sd / margin) ** 2))


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    data, base, network = train_base_model(
        seed, 16, (64, 128, 256), args.val_share, args.distortion, args.base_epochs
    )
    images = sum(len(targets) for _, targets in data.val)
    base_correct = round(evaluate_accuracy(base, data.val) * images)
    grid = width_grid(channel_layout(network))
    runs: dict[str, list[int]] = {}
    widths: dict[str, list[int]] = {}
    for method in METHODS:
        selection = get_criterion(method).select(base, network, args.ratio, grid)
        widths[method] = selection.widths
        runs[method] = []
        for order in range(args.orders):
            pruned = prune_module(base, network, selection.widths, selection.kept_indices)
            # The same pruned weights every time; only the order of the batches changes.
            torch.manual_seed(1_000 + order)
            restart_batch_order(data.train, 1_000 + order)
            train_epochs(pruned.module, data.train, args.epochs, learning_rate=args.learning_rate)
            runs[method].append(round(evaluate_accuracy(pruned.module, data.val) * images))
        print(
            f"[seed {seed}] {method:>8} {selection.widths}: {runs[method]} correct of {images} "
            f"(sd {statistics.stdev(runs[method]):.1f})",
            flush=True,
        )
    differences = [a - b for a, b in zip(runs[METHODS[0]], runs[METHODS[1]], strict=True)]
    return {
        "seed": seed,
        "val_images": images,
        "base_correct": base_correct,
        "widths": widths,
        "correct": runs,
        "sd_images": {m: statistics.stdev(v) for m, v in runs.items()},
        "same_order_differences": differences,
        "same_order_difference_sd_images": statistics.stdev(differences),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--orders", type=int, default=6, help="fine-tuning runs per pruned network")
    parser.add_argument("--ratio", type=float, default=0.8, help="keep ratio of every group")
    parser.add_argument("--distortion", type=float, default=0.5)
    parser.add_argument("--val-share", type=float, default=0.5)
    parser.add_argument("--base-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs (wgates_digits: 3 + 5)")
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--tag", help="suffix of the result file")
    args = parser.parse_args()
    if args.orders < 2:
        parser.error("--orders must be at least 2 (a spread needs two runs)")
    torch.set_num_threads(1)
    started = time.perf_counter()
    seeds = [run_seed(args, seed) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    # Pooled within-seed spread: every seed's runs differ only by the order of the batches.
    pooled = {m: statistics.mean(s["sd_images"][m] ** 2 for s in seeds) ** 0.5 for m in METHODS}
    pooled_difference = statistics.mean(s["same_order_difference_sd_images"] ** 2 for s in seeds) ** 0.5
    independent = sum(v**2 for v in pooled.values()) ** 0.5
    images = seeds[0]["val_images"]
    margins = {f"{points:.2f}_points": points / 100 * images for points in (0.1, 0.25, 0.5)}
    report = {
        "settings": vars(args),
        "seeds": seeds,
        "pooled_sd_images": pooled,
        "pooled_same_order_difference_sd_images": pooled_difference,
        "independent_order_difference_sd_images": independent,
        "seeds_for_margin_at_2_standard_errors": {
            order: {name: seeds_for_margin(sd, margin) for name, margin in margins.items()}
            for order, sd in (("independent_orders", independent), ("same_order", pooled_difference))
        },
        "seconds": time.perf_counter() - started,
        "environment": collect_environment().model_dump(mode="json"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"finetune_noise{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(report, indent=2))
    print(
        "pooled sd of one fine-tuning run: "
        + ", ".join(f"{m} {v:.1f}" for m, v in pooled.items())
        + f" images of {images}; of a difference: {independent:.1f} (independent orders), "
        + f"{pooled_difference:.1f} (same order)"
    )
    print(f"seeds for 2 standard errors: {report['seeds_for_margin_at_2_standard_errors']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
