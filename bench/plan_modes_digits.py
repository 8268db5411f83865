"""Architecture-mode and weights-mode plans versus uniform widths on digits, with and without the band.

The question: does the allocation band (`max_skew`, `min_keep_ratio`; `lpnet.gates.allocation`) cost
or buy accuracy once a plan is applied and fine-tuned? For each seed, the digits SmallResNet of
`bench/wgates_digits.py` is trained once (the same split, distortion and base epochs), LPNet is
fitted on measured width variants of it, and at each budget (a share of the unpruned measured
latency):

- four plans are made by `lpnet.gates.planner.plan` from the base model's weights: the
  architecture-only mode and the weights mode, each with the library's band (`max_skew` 1.25,
  `min_keep_ratio` 0.25) and without it (`max_skew` null, `min_keep_ratio` 0.05, the grid's floor);
  every plan is verified by measurement, as the service verifies plans;
- each plan is applied to the base model (the kept filters are the plan's: in the weights mode
  those `--filters` names, the library's default unless given; L1 norms in the architecture-only
  mode) and fine-tuned;
- uniform widths are matched to each plan's measured latency by bisection, every candidate timed
  right beside the plan's network (paired timings), and fine-tuned the same way.

Every network at a budget is fine-tuned for `--epochs` from the same base model, starting from the
same batch order (`restart_batch_order`), with the same learning rate. Uniform widths that two plans
both match are trained once. Accuracy is on the held-out digits (`--val-share` of the 1,797).

The summary gives, per budget and per plan kind, the paired accuracy difference to the matched
uniform widths (mean and standard error over seeds, wins/ties/losses in images), the band's paired
effect (banded minus unbanded, same mode), and the keep-ratio spread of the plans.

The uniform networks keep each group's first channels (a width multiplier), the plans the filters
their mode chose. `--filter-variants first l1` also fine-tunes every banded plan's widths keeping
each group's first channels (`<mode>/band@first`) or its largest filters by L1 norm
(`<mode>/band@l1`), so the summary can separate the plan's widths (`@first` minus uniform) from its
choice of filters (the plan minus `@first` or `@l1`, same widths). `--first-filters` is
`--filter-variants first`.

Timings on this machine (2 cores, 1 thread): about 10-15 minutes per seed at the defaults.

Run: `.venv/bin/python bench/plan_modes_digits.py --seeds 12` (writes bench/results/plan_modes_digits*.json);
`--first-seed` and `--combine` split a long run over processes and pool it afterwards; `--modes`
and `--bands` run a subset of the plan kinds; `--filters` and `--magnitude-prior` set the weights
mode's filter choice and W-Gate magnitude prior.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is bench/, where bench/profiler.py would shadow the profiler package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.wgates_digits import (  # noqa: E402
    CHECK_PROTOCOL,
    fit_digits_predictor,
    paired_accuracy,
    print_row,
    relative_to,
    restart_batch_order,
    train_base_model,
)
from lpnet.arch.groups import channel_layout  # noqa: E402
from lpnet.errors import BudgetInfeasible  # noqa: E402
from lpnet.gates.budget import width_grid  # noqa: E402
from lpnet.gates.criteria import get_criterion, match_latency  # noqa: E402
from lpnet.gates.options import FilterChoice, PlanMode  # noqa: E402
from lpnet.gates.planner import PlanOptions, plan  # noqa: E402
from lpnet.gates.supervised import evaluate_accuracy, train_epochs  # noqa: E402
from lpnet.pruning import ir_state_dict, prune_module  # noqa: E402
from profiler.backends.base import get_backend  # noqa: E402
from profiler.environment import retain_freed_memory  # noqa: E402
from profiler.verification import NetworkMeter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"architecture": PlanMode.ARCHITECTURE_ONLY, "weights": PlanMode.WEIGHTS}
# (max_skew, min_keep_ratio): the library's band, and none (only the grid's floor).
BANDS = {"band": (1.25, 0.25), "no-band": (None, 0.05)}
# Other filters for a banded plan's widths (`lpnet.pruning.prune_module` selections).
FILTER_VARIANTS = ("first", "l1")


def plan_kinds() -> list[str]:
    return [f"{mode}/{band}" for mode in MODES for band in BANDS]


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    started = time.perf_counter()
    data, base, network = train_base_model(
        seed, args.image_size, args.widths, args.val_share, args.distortion, args.base_epochs
    )
    base_accuracy = evaluate_accuracy(base, data.val)
    print(
        f"[seed {seed}] base model: accuracy {base_accuracy:.4f} after {time.perf_counter() - started:.0f} s"
    )
    meter = NetworkMeter.probed(get_backend("torch-cpu", threads=1), CHECK_PROTOCOL)
    predictor = fit_digits_predictor(network, args.variants, args.fit_steps, seed, meter)
    unpruned_ms = meter(network).ms
    grid = width_grid(channel_layout(network))
    weights = ir_state_dict(base, network)
    val_images = sum(len(targets) for _, targets in data.val)
    rows: list[dict[str, Any]] = [
        {
            "seed": seed,
            "method": "unpruned",
            "share": 1.0,
            "measured_ms": unpruned_ms,
            "accuracy": base_accuracy,
            "val_images": val_images,
            "widths": grid.full_widths,
        }
    ]
    print(f"[seed {seed}] unpruned {unpruned_ms:.3f} ms, predicted {predictor.predict(network).total_ms:.3f}")

    for share in args.budgets:
        budget = share * unpruned_ms
        order = 1_000_003 * seed + round(share * 1_000)  # the same batch order for every network here
        uniform_trained: dict[tuple[int, ...], dict[str, Any]] = {}

        def fine_tune(module: torch.nn.Module, order: int = order) -> float:
            restart_batch_order(data.train, order)
            train_epochs(module, data.train, args.epochs, learning_rate=args.learning_rate)
            return evaluate_accuracy(module, data.val)

        for mode_name in args.modes:
            mode = MODES[mode_name]
            for band_name in args.bands:
                max_skew, min_keep = BANDS[band_name]
                kind = f"{mode_name}/{band_name}"
                started = time.perf_counter()
                options = PlanOptions(mode=mode, max_skew=max_skew, min_keep_ratio=min_keep, seed=seed)
                if args.filters is not None:
                    options = replace(options, filters=args.filters)
                if args.magnitude_prior is not None:
                    options = replace(
                        options, gates=replace(options.gates, magnitude_prior=args.magnitude_prior)
                    )
                try:
                    result = plan(network, predictor, budget, options, weights=weights, measure=meter)
                except BudgetInfeasible as exc:
                    rows.append({"seed": seed, "method": kind, "share": share, "infeasible": exc.message})
                    print(f"  {share:.2f} {kind}: {exc.message}", flush=True)
                    continue
                kept = [g.kept_indices for g in result.groups]
                pruned = prune_module(base, network, result.widths, None if None in kept else kept)
                accuracy = fine_tune(pruned.module)
                final = meter(pruned.network)
                ratios = [g.kept / g.channels for g in result.groups]
                rows.append(
                    {
                        "seed": seed,
                        "method": kind,
                        "share": share,
                        "budget_ms": budget,
                        "measured_ms": final.ms,
                        "plan_measured_ms": result.measured_ms,
                        "accuracy": accuracy,
                        "val_images": val_images,
                        "widths": result.widths,
                        "keep_ratio_min": min(ratios),
                        "keep_ratio_max": max(ratios),
                        "warnings": result.warnings,
                        "seconds": time.perf_counter() - started,
                    }
                )
                print_row(rows[-1], method_width=24)
                for variant in args.filter_variants if band_name == "band" else ():
                    # The same widths with other filters (first channels, as the uniform networks keep,
                    # or the largest by L1 norm): separates the plan's widths from its choice of filters.
                    other = prune_module(base, network, result.widths, selection=variant)
                    rows.append(
                        {
                            "seed": seed,
                            "method": f"{kind}@{variant}",
                            "share": share,
                            "budget_ms": budget,
                            "measured_ms": meter(other.network).ms,
                            "accuracy": fine_tune(other.module),
                            "val_images": val_images,
                            "widths": result.widths,
                        }
                    )
                    print_row(rows[-1], method_width=24)

                started = time.perf_counter()
                selection, relative = match_latency(
                    get_criterion("uniform"),
                    base,
                    network,
                    grid,
                    relative_to(meter, pruned.network),
                    1.0,
                    iterations=8,
                )
                key = tuple(selection.widths)
                if key not in uniform_trained:
                    uniform = prune_module(base, network, selection.widths, selection.kept_indices)
                    uniform_trained[key] = {
                        "accuracy": fine_tune(uniform.module),
                        "measured_ms": meter(uniform.network).ms,
                    }
                rows.append(
                    {
                        "seed": seed,
                        "method": f"uniform@{kind}",
                        "share": share,
                        "budget_ms": budget,
                        "measured_ms": uniform_trained[key]["measured_ms"],
                        "latency_vs_plan": relative,
                        "accuracy": uniform_trained[key]["accuracy"],
                        "val_images": val_images,
                        "widths": selection.widths,
                        "ratio": selection.ratio,
                        "seconds": time.perf_counter() - started,
                    }
                )
                print_row(rows[-1], method_width=24)
    return rows


# A matched uniform network timed under this share of its plan's latency is a failed match (a timing
# taken during a burst of load sent the bisection low); `matched_within` leaves those pairs out.
MATCHED_SHARE = 0.85


def paired(
    rows: list[dict[str, Any]], first: str, second: str, matched_within: bool = False
) -> dict[str, Any] | None:
    """`first` minus `second`, seed by seed at one budget (`paired_accuracy`), or None without pairs.

    With `matched_within`, only the pairs whose `second` row was matched to at least `MATCHED_SHARE` of
    the first's latency.
    """
    by_seed = {
        (r["seed"], r["method"]): r
        for r in rows
        if "accuracy" in r and not (matched_within and r.get("latency_vs_plan", 1.0) < MATCHED_SHARE)
    }
    seeds = sorted(s for s, m in by_seed if m == first and (s, second) in by_seed)
    return paired_accuracy([(by_seed[(s, first)], by_seed[(s, second)]) for s in seeds]) if seeds else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for share in sorted({r["share"] for r in rows if r["method"] != "unpruned"}):
        at = [r for r in rows if r["share"] == share]
        entry: dict[str, Any] = {}
        for kind in plan_kinds():
            plans = [r for r in at if r["method"] == kind and "accuracy" in r]
            if not plans:
                continue
            entry[kind] = {
                "accuracy_mean": statistics.mean(r["accuracy"] for r in plans),
                "keep_ratio_min": min(r["keep_ratio_min"] for r in plans),
                "keep_ratio_max": max(r["keep_ratio_max"] for r in plans),
                "measured_over_budget": statistics.mean(r["measured_ms"] / r["budget_ms"] for r in plans),
                "minus_uniform": paired(at, kind, f"uniform@{kind}"),
                "minus_uniform_matched": paired(at, kind, f"uniform@{kind}", matched_within=True),
                # The matched uniform network's latency over the plan's, timed side by side when matched
                # (the final `measured_ms` of each are separate timings, minutes apart).
                "uniform_latency_vs_plan_mean": statistics.mean(
                    r["latency_vs_plan"] for r in at if r["method"] == f"uniform@{kind}"
                ),
                "infeasible_seeds": sum(r["method"] == kind and "infeasible" in r for r in at),
            }
        for mode in MODES:
            entry[f"{mode}: band minus no-band"] = paired(at, f"{mode}/band", f"{mode}/no-band")
            for variant in FILTER_VARIANTS:
                if any(r["method"] == f"{mode}/band@{variant}" for r in at):
                    # The widths with these filters against uniform widths, and the plan's own filters
                    # against these (same widths).
                    entry[f"{mode}/band@{variant} minus uniform"] = paired(
                        at, f"{mode}/band@{variant}", f"uniform@{mode}/band"
                    )
                    entry[f"{mode}/band minus {mode}/band@{variant}"] = paired(
                        at, f"{mode}/band", f"{mode}/band@{variant}"
                    )
        summary[f"{share:.2f}"] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--distortion", type=float, default=0.5)
    parser.add_argument("--val-share", type=float, default=0.5)
    parser.add_argument("--base-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs of every pruned network")
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.45, 0.6, 0.8])
    parser.add_argument("--variants", type=int, default=40, help="measured width variants for the predictor")
    parser.add_argument("--fit-steps", type=int, default=1500)
    parser.add_argument(
        "--filter-variants",
        action="extend",
        nargs="+",
        choices=FILTER_VARIANTS,
        default=[],
        help="also fine-tune each banded plan's widths with these filters: first channels, or largest L1",
    )
    parser.add_argument(
        "--first-filters",
        action="append_const",
        dest="filter_variants",
        const="first",
        help="the same as --filter-variants first",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=list(MODES), help="plan modes to run"
    )
    parser.add_argument(
        "--bands", nargs="+", choices=list(BANDS), default=list(BANDS), help="allocation bands to run"
    )
    parser.add_argument(
        "--filters",
        type=FilterChoice,
        choices=list(FilterChoice),
        help="the filters a weights-mode plan keeps (PlanOptions.filters; default: the library's)",
    )
    parser.add_argument(
        "--magnitude-prior",
        type=float,
        help="the weights mode's W-Gate magnitude prior (WGateConfig.magnitude_prior; default: the library's)",
    )
    parser.add_argument("--tag", default="", help="suffix of the result file")
    parser.add_argument("--combine", nargs="+", type=Path, help="pool these result files; run nothing")
    args = parser.parse_args()

    retain_freed_memory()  # the profiler's default allocator policy
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores; timings taken now are perturbed")
    started = time.perf_counter()
    out = RESULTS / f"plan_modes_digits{'_' + args.tag if args.tag else ''}.json"
    rows: list[dict[str, Any]] = []
    if args.combine:
        rows = [row for path in args.combine for row in json.loads(path.read_text())["rows"]]
    else:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rows.extend(run_seed(args, seed))
            write_report(out, args, rows, time.perf_counter() - started, load)  # nothing lost mid-run
    summary = write_report(out, args, rows, time.perf_counter() - started, load)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


def write_report(
    out: Path, args: argparse.Namespace, rows: list[dict[str, Any]], seconds: float, load: float
) -> dict[str, Any]:
    summary = summarise(rows)
    settings = {k: [str(p) for p in v] if k == "combine" and v else v for k, v in vars(args).items()}
    report = {
        "settings": settings,
        "rows": rows,
        "summary": summary,
        "bench_seconds": seconds,
        "load_average_at_start": load,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return summary


if __name__ == "__main__":
    main()
