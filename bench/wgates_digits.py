"""W-Gates versus uniform, L1 and Taylor pruning on digits: accuracy against *measured* latency.

A small ResNet (widths 64/128/256, 16x16 upsampled digits, 1 thread) is trained, then pruned to
budgets that are shares of its measured latency:

- W-Gates (train mode): the group counts planned through LPNet and verified by measurement
  (<= 5 rounds) before training (`--allocation planned`, the default), or learnt by the gates under
  LPNet's latency term and the capacity barrier and verified after it (`--allocation joint`); gates
  trained jointly with the network for `--gate-epochs`, physical pruning, `--finetune-epochs` of
  fine-tuning on the same cosine schedule.
- Baselines (uniform width, L1 global, L1 per layer, Taylor global): the largest keep ratio whose
  measured latency is at or under the *W-Gates network's* at the same budget, found by bisection with
  every candidate timed right beside the W-Gates network (paired timings, so the machine's drift
  between them cancels); physical pruning; `--gate-epochs + --finetune-epochs` of fine-tuning, so
  every method gets the same number of epochs after the base model. Every method at a budget
  starts its training from the same order of batches (`restart_batch_order`), so the order's noise
  largely cancels in the paired differences.

Every timing is taken against the speed probe and reported at the speed the machine had when the
seed started (profiler/verification.py; raw medians are saved beside them), so latencies measured
minutes apart on a shared machine compare; `--no-speed-probe` uses raw medians throughout.
A budget below what the narrowest network reaches (the share is of a latency that moves with the
machine) is recorded as infeasible and skipped for every method.
Every final network is measured again separately. Accuracy is on the held-out digits (`--val-share`
of the 1,797; 360 at the default 0.2, one image is 0.28 %), so differences of a few tenths of a
percent are noise: use `--seeds` to see the spread. Plain digits are too easy to tell methods apart
(every one scores 99-100 %); `--distortion` rotates, shears, shifts and adds noise to every image
(a fixed draw per seed, `service.train.datasets.distort_digits`), which leaves room below 100 %.
The predictor is fitted here on measured width variants of the network.

Timings on this machine (2 cores, 1 thread): `--quick` about 2-4 minutes; the default (15 base
epochs, 4 budgets, 5 methods, 3 + 5 epochs each) about 20-30 minutes per seed.

Run: `.venv/bin/python bench/wgates_digits.py --quick` (writes bench/results/wgates_digits*.json/png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is bench/, where bench/profiler.py would shadow the profiler package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lpnet.arch.from_torch import network_from_module  # noqa: E402
from lpnet.arch.groups import channel_layout  # noqa: E402
from lpnet.arch.ir import Network  # noqa: E402
from lpnet.errors import BudgetInfeasible  # noqa: E402
from lpnet.gates.budget import width_grid  # noqa: E402
from lpnet.gates.criteria import PruningCriterion, get_criterion, match_latency  # noqa: E402
from lpnet.gates.options import Allocation  # noqa: E402
from lpnet.gates.supervised import evaluate_accuracy, train_epochs  # noqa: E402
from lpnet.gates.training import TrainPruneConfig, train_and_prune  # noqa: E402
from lpnet.predictor.model import LPNetConfig  # noqa: E402
from lpnet.predictor.predict import LatencyPredictor  # noqa: E402
from lpnet.predictor.train import TrainConfig, fit_predictor  # noqa: E402
from lpnet.pruning import prune_module  # noqa: E402
from profiler.backends.base import get_backend  # noqa: E402
from profiler.environment import retain_freed_memory  # noqa: E402
from profiler.protocol import TimingProtocol  # noqa: E402
from profiler.variants import measure_width_variants  # noqa: E402
from profiler.verification import NetworkMeter  # noqa: E402
from service.train.datasets import DataLoaders, digits_loaders  # noqa: E402
from service.train.smallnet import SmallResNet, SmallResNetConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("uniform", "l1-global", "l1-layer", "taylor")
CHECK_PROTOCOL = TimingProtocol(
    warmup_runs=5, warmup_ms=50, min_repeat_ms=300, min_repetitions=20, target_precision=0.02, max_seconds=5.0
)
VERIFY_MARGIN = TrainPruneConfig().verify_margin


def fit_digits_predictor(
    network: Network, variants: int, steps: int, seed: int, meter: NetworkMeter
) -> LatencyPredictor:
    """LPNet fitted on measured width variants of the digits network (quick protocol)."""
    quick = meter.with_protocol(TimingProtocol.quick())
    samples = measure_width_variants(network, variants, lambda net: quick(net).ms, seed=seed)
    torch.manual_seed(seed)
    return fit_predictor(samples, LPNetConfig(), TrainConfig(steps=steps, seed=seed))


def relative_to(meter: NetworkMeter, reference: Network) -> Callable[[Network], float]:
    """Latency of a network as a share of `reference`'s, the two timed one right after the other.

    Paired timings cancel the machine's drift between them, which on a shared 2-core machine moves
    a single timing by several per cent over minutes: matching a baseline to W-Gates' latency
    measured earlier would compare the two at different speeds.
    """

    def share(net: Network) -> float:
        return meter(net).ms / meter(reference).ms

    return share


def restart_batch_order(batches: DataLoader[Any], key: int) -> None:
    """Restart the training batches' shuffling at the point `key` names.

    `run_seed` restarts at one key per (seed, budget) before each method's training, so every method
    at a budget starts from the same order of batches (common random numbers): one run's held-out
    score moves by about one point with the order alone (`bench/finetune_noise.py`), and a paired
    difference between methods that drew their own orders carries both methods' share of that. The
    baselines' epochs then see the same orders throughout; W-Gates' joint epochs do too, its
    fine-tuning ones are shifted by the pass that recomputes BatchNorm statistics after pruning.
    """
    generator = batches.generator
    if generator is None:
        raise ValueError("the training batches have no generator of their own to restart")
    generator.manual_seed(key)


def train_base_model(
    seed: int, image_size: int, widths: Sequence[int], val_share: float, distortion: float, epochs: int
) -> tuple[DataLoaders, SmallResNet, Network]:
    """The digits split of `seed`, and the SmallResNet trained on it (SGD at 0.05) with its IR."""
    torch.manual_seed(seed)
    data = digits_loaders(
        batch_size=64, image_size=image_size, val_share=val_share, seed=seed, distortion=distortion
    )
    base = SmallResNet(SmallResNetConfig(in_channels=1, num_classes=10, widths=tuple(widths)))
    network = network_from_module(base, (1, *data.input_chw), name="digits-resnet", family="digits-resnet")
    train_epochs(base, data.train, epochs, learning_rate=0.05)
    return data, base, network


def train_config(args: argparse.Namespace, seed: int) -> TrainPruneConfig:
    """W-Gates' settings: the library's defaults with the bench's epochs and learning rate."""
    return TrainPruneConfig(
        allocation=args.allocation,
        max_skew=args.max_skew,
        gate_epochs=args.gate_epochs,
        finetune_epochs=args.finetune_epochs,
        learning_rate=args.learning_rate,
        verify_margin=VERIFY_MARGIN,
        seed=seed,
    )


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    started = time.perf_counter()
    data, base, network = train_base_model(
        seed, args.image_size, args.widths, args.val_share, args.distortion, args.base_epochs
    )
    base_accuracy = evaluate_accuracy(base, data.val)
    print(
        f"[seed {seed}] base model: accuracy {base_accuracy:.4f} after {time.perf_counter() - started:.0f} s"
    )

    backend = get_backend("torch-cpu", threads=1)
    meter = (
        NetworkMeter(backend, CHECK_PROTOCOL)
        if args.no_speed_probe
        else NetworkMeter.probed(backend, CHECK_PROTOCOL)
    )
    if meter.nominal_probe_ms is not None:
        print(f"[seed {seed}] speed probe {meter.nominal_probe_ms:.3f} ms now: timings are at this speed")

    def measure(net: Network) -> float:
        return meter(net).ms

    started = time.perf_counter()
    predictor = fit_digits_predictor(network, args.variants, args.fit_steps, seed, meter)
    print(
        f"[seed {seed}] predictor from {args.variants} measured variants in {time.perf_counter() - started:.0f} s"
    )
    unpruned_ms = measure(network)
    grid = width_grid(channel_layout(network))
    val_images = sum(len(targets) for _, targets in data.val)
    rows: list[dict[str, Any]] = [
        {
            "seed": seed,
            "method": "unpruned",
            "share": 1.0,
            "budget_ms": unpruned_ms,
            "measured_ms": unpruned_ms,
            "nominal_probe_ms": meter.nominal_probe_ms,
            "accuracy": base_accuracy,
            "val_images": val_images,
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
        order = 1_000_003 * seed + round(share * 1_000)  # the same batch order for every method here
        restart_batch_order(data.train, order)
        try:
            outcome = train_and_prune(
                base,
                network,
                predictor,
                budget,
                data.train,
                data.val,
                train_config(args, seed),
                measure=meter,
            )
        except BudgetInfeasible as exc:
            # Nothing to compare at this budget: record why, and skip the baselines too.
            rows.append(
                {
                    "seed": seed,
                    "method": "w-gates",
                    "share": share,
                    "budget_ms": budget,
                    "infeasible": True,
                    "min_achievable_ms": exc.min_achievable_ms,
                }
            )
            print(f"  {share:.2f}    w-gates: {exc.message}", flush=True)
            continue
        final = meter(outcome.pruned.network)
        rows.append(
            {
                "seed": seed,
                "method": "w-gates",
                "share": share,
                "budget_ms": budget,
                "measured_ms": final.ms,
                "measured_raw_ms": final.raw_ms,
                "accuracy": outcome.accuracy_after,
                "val_images": val_images,
                "accuracy_gated": outcome.accuracy_gated,
                "accuracy_pruned": outcome.accuracy_pruned,
                "widths": outcome.plan.widths,
                "gated_counts": outcome.gated_counts,
                "rounds": [r.measured_ms for r in outcome.plan.rounds],
                "notes": outcome.plan.warnings,
                "seconds": time.perf_counter() - started,
            }
        )
        print_row(rows[-1])
        for name in args.methods:
            started = time.perf_counter()
            criterion: PruningCriterion = (
                get_criterion(name, batches=data.train, max_batches=8)
                if name == "taylor"
                else get_criterion(name)
            )
            # Matched to the W-Gates network's measured latency, each candidate timed right beside it.
            selection, relative = match_latency(
                criterion, base, network, grid, relative_to(meter, outcome.pruned.network), 1.0, iterations=8
            )
            pruned = prune_module(base, network, selection.widths, selection.kept_indices)
            accuracy_pruned = evaluate_accuracy(pruned.module, data.val)
            restart_batch_order(data.train, order)
            train_epochs(pruned.module, data.train, epochs, learning_rate=args.learning_rate)
            final = meter(pruned.network)
            rows.append(
                {
                    "seed": seed,
                    "method": name,
                    "share": share,
                    "budget_ms": budget,
                    "measured_ms": final.ms,
                    "measured_raw_ms": final.raw_ms,
                    "accuracy": evaluate_accuracy(pruned.module, data.val),
                    "val_images": val_images,
                    "accuracy_pruned": accuracy_pruned,
                    "latency_vs_wgates": relative,
                    "ratio": selection.ratio,
                    "widths": selection.widths,
                    "seconds": time.perf_counter() - started,
                }
            )
            print_row(rows[-1])
    return rows


def print_row(row: dict[str, Any], method_width: int = 10) -> None:
    print(
        f"  {row['share']:.2f} {row['method']:>{method_width}}: measured {row['measured_ms']:.3f} ms "
        f"(budget {row['budget_ms']:.3f}) accuracy {row['accuracy']:.4f} widths {row['widths']} "
        f"[{row.get('seconds', 0):.0f} s]",
        flush=True,
    )


def summarise(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Mean accuracy and measured latency per method and budget, and W-Gates' margin over the best baseline.

    A budget W-Gates found infeasible in some seed is compared over the other seeds only; one it found
    infeasible in every seed has no comparison.
    """
    summary: dict[str, Any] = {}
    shares = sorted({r["share"] for r in rows if r["method"] != "unpruned"})
    for share in shares:
        at_share = [r for r in rows if r["share"] == share]
        per_method: dict[str, Any] = {"infeasible_seeds": sum(bool(r.get("infeasible")) for r in at_share)}
        summary[f"{share:.2f}"] = per_method
        feasible = [r for r in at_share if not r.get("infeasible")]
        if not any(r["method"] == "w-gates" for r in feasible):
            continue
        for method in ["w-gates", *methods]:
            subset = [r for r in feasible if r["method"] == method]
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
        per_method["w-gates_paired"] = paired_differences(feasible, methods)
    return summary


def paired_differences(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """W-Gates minus each baseline, seed by seed (same split, same base model, same budget).

    Returns per baseline: the seeds compared, the mean accuracy difference and its standard error,
    wins / ties / losses in held-out images, and the mean measured-latency difference (ms).
    """
    by_seed = {(r["seed"], r["method"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if r["method"] == "w-gates"})
    paired: dict[str, Any] = {}
    for method in methods:
        pairs = [(by_seed[(s, "w-gates")], by_seed[(s, method)]) for s in seeds if (s, method) in by_seed]
        if not pairs:
            continue
        paired[method] = paired_accuracy(pairs)
    return paired


def paired_accuracy(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """The first of each pair of rows minus the second (same seed, split and budget).

    Returns the pairs compared, the mean accuracy difference and its standard error, wins / ties /
    losses in held-out images, and the mean measured-latency difference (ms) and ratio.
    """
    accuracy = [a["accuracy"] - b["accuracy"] for a, b in pairs]
    # Accuracies are shares of the same held-out split: the difference in images is exact.
    images = [round(d * a["val_images"]) for d, (a, _) in zip(accuracy, pairs, strict=True)]
    return {
        "seeds": len(pairs),
        "accuracy_difference_mean": statistics.mean(accuracy),
        "accuracy_difference_std_error": (
            statistics.stdev(accuracy) / len(accuracy) ** 0.5 if len(accuracy) > 1 else None
        ),
        "images_won_tied_lost": [
            sum(i > 0 for i in images),
            sum(i == 0 for i in images),
            sum(i < 0 for i in images),
        ],
        "image_difference_total": sum(images),
        "measured_ms_difference_mean": statistics.mean(a["measured_ms"] - b["measured_ms"] for a, b in pairs),
        "measured_ms_ratio_mean": statistics.mean(a["measured_ms"] / b["measured_ms"] for a, b in pairs),
    }


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
        points = [r for r in rows if r["method"] == method and not r.get("infeasible")]
        if not points:
            continue
        colour = colours.get(method)
        # Every seed's network faintly; the line joins the per-budget means (not seeds to each other),
        # with the standard error of the mean accuracy as the bar.
        axes.scatter(
            [r["measured_ms"] for r in points], [r["accuracy"] for r in points], s=12, alpha=0.3, color=colour
        )
        means = []
        for share in sorted({r["share"] for r in points}):
            at = [r for r in points if r["share"] == share]
            accuracy = [r["accuracy"] for r in at]
            error = statistics.stdev(accuracy) / len(at) ** 0.5 if len(at) > 1 else 0.0
            means.append((statistics.mean(r["measured_ms"] for r in at), statistics.mean(accuracy), error))
        x, y, err = zip(*means, strict=True)
        axes.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method, color=colour)
    axes.scatter(
        [r["measured_ms"] for r in unpruned],
        [r["accuracy"] for r in unpruned],
        marker="*",
        s=120,
        color="black",
        label="unpruned",
    )
    axes.set_xlabel("measured latency (ms, torch CPU, 1 thread)")
    axes.set_ylabel(f"validation accuracy ({rows[0]['val_images']} digits)")
    seeds = len({r["seed"] for r in rows})
    axes.set_title(f"Digits SmallResNet: accuracy vs measured latency ({seeds} seeds, mean +- s.e.)")
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
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="pool the rows of earlier result files (e.g. seeds run on separate cores) into one report",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument(
        "--distortion",
        type=float,
        default=0.0,
        help="strength in [0, 1] of the fixed random distortion of every digit (0: plain digits)",
    )
    parser.add_argument("--val-share", type=float, default=0.2, help="share of the digits held out")
    parser.add_argument(
        "--allocation",
        choices=sorted(a.value for a in Allocation),
        default="planned",
        help="W-Gates' group counts",
    )
    parser.add_argument(
        "--max-skew",
        type=float,
        default=TrainPruneConfig().max_skew,
        help="planned counts within this factor of the uniform keep ratio (see TrainPruneConfig)",
    )
    parser.add_argument("--base-epochs", type=int)
    parser.add_argument("--gate-epochs", type=int)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument(
        "--learning-rate", type=float, default=0.01, help="of the joint training and fine-tuning"
    )
    parser.add_argument("--budgets", type=float, nargs="+", help="shares of the unpruned measured latency")
    parser.add_argument("--variants", type=int, help="measured width variants for the predictor")
    parser.add_argument("--fit-steps", type=int)
    parser.add_argument(
        "--no-speed-probe", action="store_true", help="raw medians instead of the speed at the seed's start"
    )
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
    retain_freed_memory()  # the profiler's default allocator policy: timings independent of history
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} cores; latencies measured now are not representative"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ("_quick" if quick else "")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.combine:
        # Seeds run as separate processes (one per core): pool their rows into one report.
        for path in args.combine:
            rows += json.loads(Path(path).read_text())["rows"]
    else:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rows += run_seed(args, seed)
            write_report(rows, args, time.perf_counter() - started, load, suffix)
    write_report(rows, args, time.perf_counter() - started, load, suffix, show=True)


def write_report(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    seconds: float,
    load: float,
    suffix: str,
    show: bool = False,
) -> None:
    """Summarise the rows so far and write the JSON and PNG (after every seed, so none is lost)."""
    summary = summarise(rows, args.methods)
    report = {
        "settings": vars(args),
        "train_config": dataclasses.asdict(train_config(args, seed=0)),
        "rows": rows,
        "summary": summary,
        "bench_seconds": seconds,
        "load_average_at_start": load,
    }
    (RESULTS / f"wgates_digits{suffix}.json").write_text(json.dumps(report, indent=2))
    plot(rows, args.methods, RESULTS / f"wgates_digits{suffix}.png")
    if not show:
        return
    print("\nsummary (mean over seeds):")
    for share, per_method in summary.items():
        margin = per_method.get("w-gates_minus_best_baseline")
        if margin is None:
            print(f"  budget {share}: infeasible in every seed")
            continue
        cells = ", ".join(
            f"{m} {v['accuracy_mean']:.4f}@{v['measured_ms_mean']:.3f}ms"
            for m, v in per_method.items()
            if isinstance(v, dict) and "accuracy_mean" in v
        )
        print(f"  budget {share}: {cells}; w-gates - {margin['best_baseline']} = {margin['accuracy']:+.4f}")
        for method, pair in per_method["w-gates_paired"].items():
            won, tied, lost = pair["images_won_tied_lost"]
            error = pair["accuracy_difference_std_error"]
            print(
                f"    w-gates - {method}, seed by seed: {pair['accuracy_difference_mean']:+.4f}"
                f"{f' (standard error {error:.4f})' if error is not None else ''} "
                f"({pair['image_difference_total']:+d} images over {pair['seeds']} seeds; seeds won/tied/lost "
                f"{won}/{tied}/{lost}), latency {pair['measured_ms_difference_mean']:+.3f} ms"
            )
    print(f"bench took {seconds:.0f} s")
    print(f"wrote {RESULTS / f'wgates_digits{suffix}.json'} and .png")


if __name__ == "__main__":
    main()
